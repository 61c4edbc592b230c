"""tfds builders and readers; the only module that imports tensorflow_datasets (and only when it is imported).

tensorflow-datasets builds and reads `array_record` datasets without TensorFlow: a `GeneratorBasedBuilder`,
`download_and_prepare(file_format="array_record")`, then `as_data_source()` for random access. Two quirks
met on the way (tfds 4.9.10): `dataset_info_from_configs()` and the checksums lookup read files next to the
builder's source file (and the latter needs the `importlib_resources` backport for a builder inside a
package), so `_info` builds `DatasetInfo` directly and `code_path` is None; our builders skip tfds's global
registry, so they never clash with (or shadow) stock dataset names.

Layout under the data dir (tfds's own): `local_text/<config>/<version>/`, `python_stdlib/<config>/<version>/`,
where the config name is the content fingerprint from `sources.py`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import tensorflow_datasets as tfds

from aigc_jax.data import sources
from aigc_jax.errors import UserError

_READ_CHUNK = 256  # records fetched per ArrayRecord call


class _TextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One example per document: {"name": its path/topic, "text": its text}."""

    VERSION = tfds.core.Version(sources.BUILDER_VERSION)
    # tfds looks for a checksums file beside a builder's source file; resolving that path for a builder
    # defined inside a package imports the `importlib_resources` backport (only a dependency on Python < 3.9).
    # These builders download nothing, so there is no checksums file to find.
    code_path = None

    def __init__(self, source: sources.Source, data_dir: Path):
        self._source = source
        super().__init__(data_dir=str(data_dir), config=tfds.core.BuilderConfig(name=source.config))

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self._source.name,
            features=tfds.features.FeaturesDict({"name": tfds.features.Text(), "text": tfds.features.Text()}),
        )

    # tfds prints these two banners to stdout, where a CLI's JSON output must stay clean.
    def _log_download_bytes(self):
        pass

    def _log_download_done(self):
        pass

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(docs) for split, docs in sources.documents(self._source).items()}

    def _generate_examples(self, docs):
        for name, read in docs:
            yield name, {"name": name, "text": read()}


class LocalText(_TextBuilder, skip_registration=True):
    """The user's text files (name "local_text")."""


class PythonStdlib(_TextBuilder, skip_registration=True):
    """The embedded default corpus (name "python_stdlib")."""


_BUILDERS = {"local_text": LocalText, "default": PythonStdlib}


def documents(source: sources.Source, data_dir: Path) -> dict[str, tuple[int, Iterator[bytes]]]:
    """{"train"/"validation": (number of documents, their UTF-8 texts)}, building the dataset if needed."""
    builder = _builder(source, data_dir)
    fmt = builder.info.file_format
    if fmt is None or fmt.value != "array_record":
        raise UserError(
            f"{source.name} in {builder.data_dir} is stored as {fmt.value if fmt else 'unknown format'}, which needs "
            f"TensorFlow to read: rebuild it with `tfds build ... --file_format=array_record`"
        )
    splits = builder.info.splits
    val_split = next((s for s in ("validation", "test") if s in splits), None)
    if "train" not in splits or val_split is None:
        raise UserError(f"{source.name} has splits {sorted(splits)}; need 'train' and 'validation' (or 'test')")
    field = _text_field(builder, source)
    data = builder.as_data_source()
    return {"train": _read(data["train"], field), "validation": _read(data[val_split], field)}


def _builder(source: sources.Source, data_dir: Path) -> tfds.core.DatasetBuilder:
    if source.kind == "tfds":
        return tfds.builder_from_directory(source.builder_dir)
    with _quiet():
        builder = _BUILDERS[source.kind](source, data_dir)
        try:
            builder.download_and_prepare(file_format="array_record")
        except FileExistsError:
            # Another process finished preparing the same dataset first; read its copy.
            builder = _BUILDERS[source.kind](source, data_dir)
            if not builder.is_prepared():
                raise
    return builder


@contextlib.contextmanager
def _quiet():
    # tfds warns about our (deliberately) custom configs and draws nested progress bars; corpus.py logs one
    # line per dataset instead.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    tfds.display_progress_bar(False)
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)
        tfds.display_progress_bar(True)


def _text_field(builder: tfds.core.DatasetBuilder, source: sources.Source) -> str:
    texts = [k for k, f in builder.info.features.items() if isinstance(f, tfds.features.Text)]
    if "text" in texts or len(texts) == 1:
        return "text" if "text" in texts else texts[0]
    raise UserError(f"{source.name} has text features {texts or 'none'}; expected one named 'text'")


def _read(data, field: str) -> tuple[int, Iterator[bytes]]:
    def records():
        for start in range(0, len(data), _READ_CHUNK):
            for record in data.__getitems__(range(start, min(start + _READ_CHUNK, len(data)))):
                yield record[field]

    return len(data), records()
