"""What a `--data` string names, where its files live, and which documents are validation — without tfds.

Everything here is cheap (stat calls, small hashes), so a cached token stream can be found and reused on a
machine without tensorflow-datasets; only building a dataset needs tfds (see `builders.py`).

Source grammar:
    default                          the embedded corpus (`default_corpus()`)
    tfds:NAME[/CONFIG][:VERSION]     a stock tfds dataset already prepared (array_record) in a data dir
    PATH.jsonl                       prompt→completion examples (see `examples.py`)
    PATH                             a text file, a directory (every non-hidden file under it) or a glob
                                     (a file named "default" is ./default)

Train/validation split (`VALIDATION_FRACTION` = 10%):
- one text file: its first 90% of characters train, the rest validate (nanoGPT's rule);
- several documents: a document validates when the SHA-256 of its name (path relative to the corpus root),
  read as a fraction of 2**64, is < 0.1 — stable when files are added or removed. At least one document
  lands on each side: if no name hashes below 0.1, the lowest hash validates; if all do, the highest trains.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import sys
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from aigc_jax.errors import UserError

VALIDATION_FRACTION = 0.1
# Bumped when what a builder writes changes, so old caches are not reused.
BUILDER_VERSION = "1.0.0"
ENV_DATA_DIR = "AIGC_DATA_DIR"

# Default corpus: the standard library's *.py files minus tests, bundled tool/demo apps, codec tables
# (`encodings/` is mostly generated mapping tables) and site-packages, plus the `pydoc_data` help topics
# (English prose: the Python reference's sections on statements, operators, types…) as one document each.
STDLIB_EXCLUDED_DIRS = frozenset({
    "__pycache__", "site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo",
    "ensurepip", "encodings", "pydoc_data",
})

# A document loader returns the document's text; it is called once, while the tfds dataset is built.
Document = tuple[str, Callable[[], str]]


@dataclass(frozen=True)
class Source:
    kind: str  # "default" | "local_text" | "tfds" | "jsonl"
    name: str  # for messages and TokenData.name
    key: str  # relative cache path; changes whenever the content may have changed
    files: tuple[str, ...] = ()
    root: str = ""
    builder_dir: str = ""  # tfds: the prepared <data_dir>/NAME[/CONFIG]/VERSION directory
    total_bytes: int = 0
    config: str = ""  # the tfds builder config name of our own builders (a content fingerprint)


def default_data_dir() -> Path:
    """$AIGC_DATA_DIR, else $XDG_CACHE_HOME/aigc_jax/datasets (~/.cache/aigc_jax/datasets)."""
    if os.environ.get(ENV_DATA_DIR):
        return Path(os.environ[ENV_DATA_DIR]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "aigc_jax" / "datasets"


def tfds_data_dirs(data_dir: Path, explicit: bool) -> list[Path]:
    """Where `tfds:` datasets are looked for: the data dir, plus tfds's own default when none was given."""
    dirs = [data_dir]
    if not explicit:
        dirs.append(Path(os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")))
    return dirs


def parse(spec: str, data_dir: Path, explicit_data_dir: bool = True) -> Source:
    """Resolves a `--data` string (see the module docstring) into a Source, with one-line errors."""
    spec = spec.strip()
    if spec == "default":
        return default_corpus()
    if spec.startswith("tfds:"):
        return stock(spec[len("tfds:"):], tfds_data_dirs(data_dir, explicit_data_dir))
    files, root = expand(spec)
    if spec.endswith(".jsonl") and len(files) == 1:
        return Source("jsonl", spec, f"jsonl/{_stat_fingerprint(files, root)}", files, root, total_bytes=_size(files))
    if not _size(files):
        raise UserError(f"--data {spec}: the corpus is empty ({len(files)} file(s), 0 bytes)")
    config = "f" + _stat_fingerprint(files, root)
    return Source("local_text", f"local_text({spec})", f"local_text/{config}/{BUILDER_VERSION}", files, root,
                  total_bytes=_size(files), config=config)


def expand(spec: str) -> tuple[tuple[str, ...], str]:
    """A file, a directory (all non-hidden files below it) or a glob -> (sorted absolute files, their root)."""
    path = os.path.abspath(os.path.expanduser(spec))
    if os.path.isfile(path):
        return (path,), os.path.dirname(path)
    if os.path.isdir(path):
        files = []
        for d, dirs, names in os.walk(path):
            dirs[:] = [x for x in dirs if not x.startswith(".")]
            files += [os.path.join(d, f) for f in names if not f.startswith(".")]
        if not files:
            raise UserError(f"--data {spec}: the directory has no (non-hidden) files")
        return tuple(sorted(files)), path
    if glob.has_magic(path):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise UserError(f"--data {spec}: no file matches this pattern")
        return tuple(files), os.path.commonpath([os.path.dirname(f) for f in files])
    raise UserError(f"--data {spec}: no such file or directory (expected 'default', a text file, a directory, "
                    "a glob, a .jsonl file, or tfds:NAME)")


def documents(source: Source) -> dict[str, list[Document]]:
    """The documents of each split of a local or default source, in a fixed order."""
    if source.kind != "default" and len(source.files) == 1:
        return _split_one_file(source.files[0])
    docs = all_documents(source)
    val = validation_names([name for name, _ in docs])
    return {"train": [d for d in docs if d[0] not in val], "validation": [d for d in docs if d[0] in val]}


def all_documents(source: Source) -> list[Document]:
    """Every document of a local or default source, unsplit, in a fixed order (a single file is one document)."""
    if source.kind == "default":
        return _stdlib_documents()
    return [(os.path.relpath(f, source.root), _reader(f)) for f in source.files]


def validation_names(names: Sequence[str]) -> set[str]:
    """The names that go to validation under the hash rule in the module docstring."""
    if len(names) < 2:
        raise UserError(f"need at least 2 documents to split train/validation, got {len(names)}")
    h = {n: int.from_bytes(hashlib.sha256(n.encode()).digest()[:8], "big") / 2.0**64 for n in names}
    val = {n for n in names if h[n] < VALIDATION_FRACTION}
    if not val:
        val = {min(names, key=h.get)}
    if len(val) == len(names):
        val.discard(max(names, key=h.get))
    return val


def _split_one_file(path: str) -> dict[str, list[Document]]:
    def part(train: bool) -> str:
        text = _read(path)
        cut = int(len(text) * (1 - VALIDATION_FRACTION))
        return text[:cut] if train else text[cut:]

    name = os.path.basename(path)
    return {"train": [(name, lambda: part(True))], "validation": [(name, lambda: part(False))]}


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                        "pass a glob that selects only text files") from None


def _reader(path: str) -> Callable[[], str]:
    return lambda: _read(path)


def _size(files: Sequence[str]) -> int:
    return sum(os.path.getsize(f) for f in files)


def _stat_fingerprint(files: Sequence[str], root: str) -> str:
    # Names relative to the root, sizes and mtimes: cheap for corpora of many GB, and any edit changes it.
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.relpath(f, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# --- the embedded default corpus ------------------------------------------------------------------------------

def stdlib_files() -> tuple[Path, list[Path]]:
    """(stdlib root, the selected *.py files sorted by relative path)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for d, dirs, names in os.walk(root):
        # Pruned while walking: site-packages alone can hold far more files than the stdlib.
        top = Path(d) == root
        dirs[:] = [x for x in dirs if x not in STDLIB_EXCLUDED_DIRS and not (top and x.startswith("config-"))]
        files += [Path(d) / n for n in names if n.endswith(".py")]
    return root, sorted(files, key=lambda f: f.relative_to(root).as_posix())


def _pydoc_topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it; the corpus is then code only
        return {}
    return dict(sorted(topics.items()))


def _stdlib_documents() -> list[Document]:
    root, files = stdlib_files()
    docs: list[Document] = [(f.relative_to(root).as_posix(), _reader(str(f))) for f in files]
    docs += [(f"pydoc_data/topics/{k}", (lambda v: lambda: v)(v)) for k, v in _pydoc_topics().items()]
    return docs


def default_corpus() -> Source:
    """The embedded corpus; its key hashes every byte, so machines with identical stdlibs share one cache."""
    root, files = stdlib_files()
    h, total = hashlib.sha256(), 0
    for f in files:
        data = f.read_bytes()
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + data)
        total += len(data)
    for k, v in _pydoc_topics().items():
        h.update(k.encode() + b"\0" + v.encode())
        total += len(v.encode())
    if not files:
        raise UserError(f"the default corpus is empty: no *.py sources under {root} (a stripped Python install?); "
                        "pass --data PATH instead")
    v = sys.version_info
    config = f"py{v.major}_{v.minor}_{v.micro}_{h.hexdigest()[:12]}"
    return Source("default", "default (python stdlib + pydoc topics)", f"python_stdlib/{config}/{BUILDER_VERSION}",
                  root=str(root), total_bytes=total, config=config)


# --- stock tfds datasets -------------------------------------------------------------------------------------

_VERSION = re.compile(r"\d+\.\d+\.\d+")


def stock(spec: str, data_dirs: Sequence[Path]) -> Source:
    """`NAME[/CONFIG][:VERSION]` prepared (by `tfds build`) in one of `data_dirs`."""
    m = re.fullmatch(r"([A-Za-z0-9_]+)(?:/([A-Za-z0-9_.+-]+))?(?::(\d+\.\d+\.\d+))?", spec)
    if not m:
        raise UserError(f"--data tfds:{spec}: expected tfds:NAME[/CONFIG][:VERSION], e.g. tfds:tiny_shakespeare")
    name, config, version = m.groups()
    for data_dir in data_dirs:
        builder_dir = _find_version_dir(Path(data_dir) / name, config, version, spec)
        if builder_dir is not None:
            info = hashlib.sha256((builder_dir / "dataset_info.json").read_bytes()).hexdigest()[:12]
            rel = builder_dir.relative_to(data_dir).as_posix()
            return Source("tfds", f"tfds:{rel}", f"tfds/{rel}/{info}", builder_dir=str(builder_dir))
    dirs = " or ".join(str(d) for d in data_dirs)
    raise UserError(
        f"tfds dataset {spec} is not prepared in {dirs} (no network here): on a machine with network run "
        f"`tfds build {spec.split(':')[0]} --file_format=array_record --data_dir DIR`, "
        "copy DIR here and pass --data-dir DIR"
    )


def _find_version_dir(base: Path, config: str | None, version: str | None, spec: str) -> Path | None:
    if config is None and base.is_dir() and not _versions(base):
        configs = sorted(d.name for d in base.iterdir() if d.is_dir() and _versions(d))
        if len(configs) > 1:
            raise UserError(f"tfds:{spec} has several prepared configs ({', '.join(configs)}): "
                            f"name one, e.g. tfds:{base.name}/{configs[0]}")
        config = configs[0] if configs else None
    if config is not None:
        base = base / config
    versions = _versions(base)
    if version is not None:
        return base / version if version in versions else None
    return base / max(versions, key=lambda v: tuple(map(int, v.split(".")))) if versions else None


def _versions(d: Path) -> list[str]:
    if not d.is_dir():
        return []
    return [v.name for v in d.iterdir() if _VERSION.fullmatch(v.name) and (v / "dataset_info.json").is_file()]
