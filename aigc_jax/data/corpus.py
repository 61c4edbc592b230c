"""`load(source, tokenizer)`: a `--data` string -> tokenized train/validation splits, tokenized once and cached.

The token cache lives at `<data_dir>/tokens-v1/<source key>/<tokenizer hash>/` (raw uint16 arrays when the vocab
fits, else uint32, plus meta.json). The source key changes with the content (see `sources.py`), the
tokenizer hash is the SHA-256 of its tokenizer.json, so a changed corpus or tokenizer never reuses a stale
stream, and a second run memory-maps the stream without importing tensorflow_datasets at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aigc_jax.data import cache, examples, sources
from aigc_jax.errors import UserError

log = logging.getLogger(__name__)

_BATCH_CHARS = 4 << 20  # text per encode_batch call: enough for all cores, bounded memory
_PIECE_CHARS = 1 << 20  # long documents are encoded in pieces of about this size (see _line_pieces)
_LINE_START = re.compile(r"\n(?=\S)")
_CACHE = "tokens-v2"  # bumped whenever the cache's layout, meta.json or the ids it holds change
_EXAMPLES_CACHE = "examples-v3"  # the same for prompt→completion examples (v3: prompts encoded as `generate` does)


@dataclass(frozen=True)
class TokenData:
    """Tokenized splits of one source. For text, `train`/`validation` are flat token arrays (documents joined
    by EOT); for JSONL they are `Examples`. `bytes_per_token` is validation UTF-8 bytes per loss token
    (text: bytes / tokens including EOTs; JSONL: completion bytes / (completion tokens + EOTs)), so
    bits per byte = mean loss in nats / ln 2 / bytes_per_token."""

    name: str
    train: np.ndarray | examples.Examples
    validation: np.ndarray | examples.Examples
    bytes_per_token: float
    eot_id: int
    key: str  # "<source key>/<tokenizer hash>": where this token stream is cached
    stats: dict = field(repr=False, default_factory=dict)
    content_hash: str = ""  # SHA-256 (16 hex) of every token of both splits: what a resumed run checks




def tokenizer_hash(tokenizer) -> str:
    return hashlib.sha256(tokenizer.hf.to_str().encode()).hexdigest()[:16]


def load(source: str, tokenizer, data_dir: str | Path | None = None) -> TokenData:
    """Resolves `source` (grammar in `sources.py`), builds its tfds dataset and token cache once, returns both
    splits memory-mapped. `data_dir` defaults to $AIGC_DATA_DIR or ~/.cache/aigc_jax/datasets."""
    explicit = data_dir is not None
    data_dir = Path(data_dir).expanduser() if explicit else sources.default_data_dir()
    src = sources.parse(source, data_dir, explicit)
    key = f"{src.key}/{tokenizer_hash(tokenizer)}"
    if src.kind == "jsonl":
        meta, arrays = cache.cached(data_dir / _EXAMPLES_CACHE / key,
                                    lambda tmp: _hashed(examples.build(src, tokenizer, tmp), tmp))
        train, validation = examples.from_cache(arrays, "train"), examples.from_cache(arrays, "validation")
    else:
        meta, arrays = cache.cached(data_dir / _CACHE / key,
                                    lambda tmp: _hashed(_build_stream(src, tokenizer, data_dir, tmp), tmp))
        train, validation = arrays["train"], arrays["validation"]
    return TokenData(src.name, train, validation, meta["bytes_per_token"], meta["eot_id"], key, meta,
                     meta["content_hash"])


def content_hash(arrays: dict[str, np.ndarray]) -> str:
    """A hash of token arrays (names, dtypes, shapes and values): the same tokens give the same hash anywhere."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{a.dtype.name}\0{a.shape}\0".encode())
        for start in range(0, a.size, 1 << 24):  # in pieces: a memory-mapped stream may be larger than RAM
            h.update(a.reshape(-1)[start : start + (1 << 24)].tobytes())
    return h.hexdigest()[:16]


def load_text(source: str, data_dir: str | Path | None = None, split: str = "train") -> str:
    """The raw text of one split, documents joined by newlines: what character-level or freshly trained BPE
    tokenizers are built from (before `load` can tokenize anything)."""
    explicit = data_dir is not None
    data_dir = Path(data_dir).expanduser() if explicit else sources.default_data_dir()
    src = sources.parse(source, data_dir, explicit)
    if src.kind == "jsonl":
        raise UserError(f"{source}: building a tokenizer from prompt/completion data is not supported; "
                        "pass --tokenizer byte or a tokenizer directory")
    from aigc_jax.data import builders

    _, docs = builders.documents(src, data_dir)[split]
    return "\n".join(doc.decode("utf-8", errors="replace") for doc in docs)


def _hashed(meta: dict, tmp: Path) -> dict:
    """meta with the content hash of the arrays just written to `tmp` (computed once, at build time)."""
    _, arrays = cache.read_arrays(tmp, meta)
    return {**meta, "content_hash": content_hash(arrays)}


def _build_stream(src: sources.Source, tokenizer, data_dir: Path, tmp: Path) -> dict:
    try:
        from aigc_jax.data import builders
    except ImportError as e:
        raise UserError(f"preparing {src.name} needs tensorflow-datasets and array-record ({e}): "
                        "pip install tensorflow-datasets array-record, or pass a --data-dir already prepared") from None
    start = time.perf_counter()
    log.info("preparing %s in %s", src.name, data_dir)
    splits = builders.documents(src, data_dir)
    prepared = time.perf_counter()
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    meta = {"source": src.name, "kind": src.kind, "eot_id": tokenizer.eot_id, "vocab_size": tokenizer.vocab_size,
            "arrays": {}, "splits": {}}
    for split, (n_docs, docs) in splits.items():
        stats = {"documents": n_docs, "bytes": 0, "tokens": 0}
        with open(tmp / f"{split}.bin", "wb") as f, _progress(f"tokenizing {src.name} {split}", n_docs) as bar:
            for ids in encode_documents(_counted(docs, stats, bar), tokenizer):
                f.write(ids.astype(dtype).tobytes())
                stats["tokens"] += len(ids)
        if not stats["tokens"]:
            raise UserError(f"{src.name}: the {split} split has no text (documents: {n_docs}); add more text")
        meta["splits"][split] = stats
        meta["arrays"][split] = {"dtype": dtype.name, "shape": [stats["tokens"]]}
    meta["bytes_per_token"] = meta["splits"]["validation"]["bytes"] / meta["splits"]["validation"]["tokens"]
    meta["seconds"] = {"prepare": round(prepared - start, 3), "tokenize": round(time.perf_counter() - prepared, 3)}
    log.info("%s: %s", src.name, meta["splits"])
    return meta


def _counted(docs: Iterable[bytes], stats: dict, bar) -> Iterator[str]:
    for doc in docs:
        stats["bytes"] += len(doc)
        bar.update(1)
        yield doc.decode("utf-8")


def _progress(desc: str, total: int):
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, silence in logs and tests.
    return tqdm(total=total, desc=desc, unit="doc", disable=None, leave=False)


def encode_documents(docs: Iterable[str], tokenizer) -> Iterator[np.ndarray]:
    """Token ids of the documents, each followed by EOT, in batches (HF encodes a batch on all cores).
    Empty documents are skipped. Text is ordinary text: a literal "<|endoftext|>" in a document is encoded as its
    characters, never as the EOT id (which only separates documents)."""
    # encode_batch_fast (tokenizers >= 0.21) skips offset tracking: about twice as fast.
    encode = getattr(tokenizer.ordinary, "encode_batch_fast", tokenizer.ordinary.encode_batch)
    split = _line_pieces if _line_split_is_exact(tokenizer) else lambda text: [text]
    eot = np.array([tokenizer.eot_id], np.int64)
    pieces: list[str] = []
    ends: list[bool] = []  # piece ends a document: an EOT follows it
    size = 0

    def flush() -> np.ndarray:
        try:
            encodings = encode(pieces, add_special_tokens=False)
        except Exception:  # tokenizers raises a bare Exception, e.g. a character outside a char-level vocabulary
            tokenizer.encode_ordinary_batch(pieces)  # the wrapper turns that into a UserError naming the cause
            raise
        arrays = []
        for e, end in zip(encodings, ends):
            arrays.append(np.array(e.ids, np.int64))
            if end:
                arrays.append(eot)
        return np.concatenate(arrays)

    for doc in docs:
        if not doc:
            continue
        parts = split(doc)
        pieces += parts
        ends += [False] * (len(parts) - 1) + [True]
        size += len(doc)
        if size >= _BATCH_CHARS:
            yield flush()
            pieces, ends, size = [], [], 0
    if pieces:
        yield flush()


def _line_pieces(text: str) -> list[str]:
    # Cut after a newline that is followed by a non-space character: GPT-2's pre-tokenizer regex always
    # ends a pre-token there, and BPE never merges across pre-tokens, so the ids are unchanged.
    pieces, start = [], 0
    while len(text) - start > _PIECE_CHARS:
        m = _LINE_START.search(text, start + _PIECE_CHARS)
        if m is None:
            break
        pieces.append(text[start : m.end()])
        start = m.end()
    pieces.append(text[start:])
    return pieces


def _line_split_is_exact(tokenizer) -> bool:
    """True when encoding a text in `_line_pieces` gives the same ids as encoding it whole: byte-level
    pre-tokenization with GPT-2's regex, or byte-level with no merges at all (`tokenizers.byte_level()`), and no
    prefix space (with `add_prefix_space` every piece would gain a space at its start)."""
    spec = json.loads(tokenizer.hf.to_str())
    pre = spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") or pre.get("type") != "ByteLevel" or pre.get("add_prefix_space"):
        return False
    return bool(pre.get("use_regex", True)) or not spec["model"].get("merges")
