"""Sources, tfds builders (array_record, no TensorFlow), the token cache and its errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import python_module

from aigc_jax import data, tokenizers
from aigc_jax.data import cache, corpus, sources
from aigc_jax.errors import UserError

EOT = 256  # byte_level(): ids 0..255 are bytes


class CountingHF:
    """Wraps an HF tokenizer and counts encode calls (the Rust object itself cannot be patched)."""

    def __init__(self, hf):
        self._hf, self.calls = hf, 0

    def __getattr__(self, name):
        if name.startswith("encode"):
            self.calls += 1
        return getattr(self._hf, name)


def counting_byte_level():
    tok = tokenizers.byte_level()
    tok.hf = tok._ordinary = CountingHF(tok.ordinary)  # the data pipeline encodes through `ordinary`
    return tok


def text_of(tokens: np.ndarray) -> list[str]:
    """The documents of a byte-level stream (each ends with EOT)."""
    tokens = np.asarray(tokens)
    docs = np.split(tokens, np.flatnonzero(tokens == EOT) + 1)
    return [bytes(d[d != EOT].astype(np.uint8)).decode() for d in docs if len(d)]


def test_tfds_is_not_imported_by_the_package():
    argv, env = python_module("isolated.batches_without_tfds")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(4, 9)"


def test_single_file_splits_90_10_by_character_and_the_second_load_uses_the_cache(tmp_path):
    text = "".join(f"line {i}: é\n" for i in range(400))
    path = tmp_path / "a.txt"
    path.write_text(text, encoding="utf-8")
    tok = counting_byte_level()
    ds = data.load(str(path), tok, data_dir=tmp_path / "d")
    cut = int(len(text) * 0.9)
    assert text_of(ds.train) == [text[:cut]] and text_of(ds.validation) == [text[cut:]]
    assert ds.train[-1] == EOT and ds.train.dtype == np.uint16
    assert ds.bytes_per_token == len(text[cut:].encode()) / (len(text[cut:].encode()) + 1)
    built = tok.hf.calls
    assert built > 0
    # The tfds dataset really is array_record on disk, prepared by tfds (no TensorFlow here).
    assert list((tmp_path / "d" / "local_text").rglob("*.array_record-*"))

    again = data.load(str(path), tok, data_dir=tmp_path / "d")
    assert tok.hf.calls == built  # nothing re-tokenized
    assert again.key == ds.key and isinstance(again.train, np.memmap)
    np.testing.assert_array_equal(again.train, ds.train)

    path.write_text(text + "more\n", encoding="utf-8")  # an edit makes a new key: never a stale stream
    edited = data.load(str(path), tok, data_dir=tmp_path / "d")
    assert edited.key != ds.key and tok.hf.calls > built


def test_the_cache_is_read_without_tfds(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("hello world\n" * 50)
    ds = data.load(str(path), tokenizers.byte_level(), data_dir=tmp_path / "d")
    argv, env = python_module("isolated.cache_without_tfds", path, tmp_path / "d")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [ds.key, str(len(ds.train)), "(2,", "9)"]


def test_directory_splits_whole_documents_and_no_window_crosses_the_split(tmp_path):
    root = tmp_path / "corpus"
    letters = "abcdefghijklmnopqrstuvwxyz"
    for i, ch in enumerate(letters):
        (root / f"sub{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"sub{i % 3}" / f"{ch}.txt").write_text(ch * (50 + i))
    (root / ".hidden").write_text("!" * 100)  # hidden files are not corpus
    ds = data.load(str(root), tokenizers.byte_level(), data_dir=tmp_path / "d")
    train_docs, val_docs = text_of(ds.train), text_of(ds.validation)
    assert sorted(train_docs + val_docs) == sorted(ch * (50 + i) for i, ch in enumerate(letters))
    names = [f"sub{i % 3}/{ch}.txt" for i, ch in enumerate(letters)]
    expected_val = sources.validation_names(names)
    assert {d[0] for d in val_docs} == {n[-5] for n in expected_val} and 1 <= len(val_docs) < len(letters)
    val_letters = {ord(d[0]) for d in val_docs}
    sampler = data.Batches(ds.train, 16, 8, seed=0)
    for step in range(2 * sampler.steps_per_epoch):
        assert not val_letters & set(sampler.batch(step)["tokens"].ravel().tolist())


def test_validation_rule_is_stable_and_never_leaves_a_side_empty():
    names = [f"doc{i}" for i in range(200)]
    val = sources.validation_names(names)
    assert 10 <= len(val) <= 30
    assert sources.validation_names(names[:150]) == val & set(names[:150])  # adding files moves nobody
    for k in (2, 3):
        v = sources.validation_names(names[:k])
        assert 1 <= len(v) < k


def test_stock_tfds_dataset_is_read_from_the_data_dir(tmp_path):
    import tensorflow_datasets as tfds

    class TinyShakespeare(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Stands in for the stock dataset (same name and features) — there is no network here."""

        VERSION = tfds.core.Version("1.0.0")
        code_path = None

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(s) for s in ("train", "validation", "test")}

        def _generate_examples(self, split):
            yield split, {"text": f"the {split} text\n" * 20}

    TinyShakespeare(data_dir=str(tmp_path / "tfds")).download_and_prepare(file_format="array_record")
    ds = data.load("tfds:tiny_shakespeare", tokenizers.byte_level(), data_dir=tmp_path / "tfds")
    assert ds.name == "tfds:tiny_shakespeare/1.0.0"
    assert text_of(ds.train) == ["the train text\n" * 20] and text_of(ds.validation) == ["the validation text\n" * 20]
    assert data.load("tfds:tiny_shakespeare:1.0.0", tokenizers.byte_level(), data_dir=tmp_path / "tfds").key == ds.key

    with pytest.raises(UserError, match=r"tfds dataset lm1b is not prepared in .*tfds build lm1b "
                                        r"--file_format=array_record --data_dir DIR.*--data-dir DIR"):
        data.load("tfds:lm1b", tokenizers.byte_level(), data_dir=tmp_path / "tfds")
    with pytest.raises(UserError, match="is not prepared"):
        data.load("tfds:tiny_shakespeare:2.0.0", tokenizers.byte_level(), data_dir=tmp_path / "tfds")


def test_our_own_builder_output_reads_back_through_the_tfds_path(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("abc\n" * 100)
    ds = data.load(str(path), tokenizers.byte_level(), data_dir=tmp_path / "d")
    config = ds.key.split("/")[1]
    via_tfds = data.load(f"tfds:local_text/{config}", tokenizers.byte_level(), data_dir=tmp_path / "d")
    np.testing.assert_array_equal(via_tfds.train, ds.train)


@pytest.mark.parametrize("make,spec,message", [
    (lambda d: None, "missing.txt", "missing.txt: no such file or directory"),
    (lambda d: (d / "e.txt").write_text(""), "e.txt", r"e.txt: the corpus is empty \(1 file\(s\), 0 bytes\)"),
    (lambda d: (d / "e").mkdir(), "e", "the directory has no"),
    (lambda d: None, "*.md", "no file matches this pattern"),
    (lambda d: (d / "b.bin").write_bytes(b"ok\xff\xfe" * 10), "b.bin", r"b.bin is not UTF-8 text"),
    (lambda d: None, "tfds:bad name", "expected tfds:NAME"),
])
def test_source_errors_are_one_line_user_errors(tmp_path, make, spec, message):
    make(tmp_path)
    with pytest.raises(UserError, match=message) as info:
        data.load(str(tmp_path / spec) if not spec.startswith("tfds:") else spec, tokenizers.byte_level(),
                  data_dir=tmp_path / "d")
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "d").rglob("meta.json"))


def test_concurrent_processes_build_once_and_agree(tmp_path):
    # What several processes of one job do on first use of a shared data dir.
    path = tmp_path / "a.txt"
    path.write_text("some text\n" * 300)
    argv, env = python_module("isolated.load_data", path, tmp_path / "d")
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert len({out for out, _ in outs}) == 1
    assert len(list((tmp_path / "d").rglob("meta.json"))) == 1
    assert not list((tmp_path / "d").rglob("*.tmp-*")) and not list((tmp_path / "d").rglob("incomplete.*"))


def test_a_failed_build_leaves_no_cache_behind(tmp_path):
    def build(tmp):
        (tmp / "train.bin").write_bytes(b"partial")
        raise KeyboardInterrupt  # a killed run

    with pytest.raises(KeyboardInterrupt):
        cache.cached(tmp_path / "c" / "key", build)
    assert [p.name for p in (tmp_path / "c").iterdir()] == [".key.lock"]  # no cache, no temporary left


def _generated_text(n_lines: int, seed: int = 0) -> str:
    """Python-looking text with words, indentation, blank lines and non-ASCII: enough variety for BPE merges."""
    rng = np.random.default_rng(seed)
    words = ["def", "return", "self", "value", "naïve", "x", "if", "else:", "for", "in", "range(10)", "café", "#"]
    lines = []
    for i in range(n_lines):
        indent = " " * int(rng.choice([0, 4, 8]))
        lines.append(indent + " ".join(rng.choice(words, int(rng.integers(1, 8)))) + ("\n" if i % 7 == 0 else ""))
    return "\n".join(lines) + "\n"


def test_long_documents_are_encoded_in_pieces_with_identical_ids(monkeypatch):
    from tokenizers import pre_tokenizers

    text = _generated_text(20_000)
    bpe = tokenizers.train_bpe([text], 600)
    prefixed = tokenizers.Tokenizer(tokenizers.tokenizers.Tokenizer.from_str(bpe.hf.to_str()))
    prefixed.hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    monkeypatch.setattr(corpus, "_PIECE_CHARS", 5000)
    assert len(corpus._line_pieces(text)) > 30
    for tok, exact in ((bpe, True), (tokenizers.byte_level(), True), (prefixed, False),
                       (tokenizers.char_level(text), False)):
        assert corpus._line_split_is_exact(tok) == exact
        ids = np.concatenate(list(corpus.encode_documents([text], tok)))
        assert ids.tolist() == tok.encode(text) + [tok.eot_id]
    # What the check guards against: cutting a prefix-space tokenizer's text in pieces changes its ids.
    pieces = corpus._line_pieces(text)
    assert sum(prefixed.encode_batch(pieces), []) != prefixed.encode(text)


def test_end_of_text_inside_a_document_is_text_not_a_boundary(tmp_path):
    """nanoGPT's encode_ordinary rule: only the pipeline puts EOT ids between documents."""
    byte = tokenizers.byte_level()
    (tmp_path / "a.txt").write_text("a<|endoftext|>b\n" * 50)
    (tmp_path / "b.txt").write_text("plain text\n" * 50)
    ds = data.load(str(tmp_path), byte, data_dir=tmp_path / "d")
    stream = np.concatenate([np.asarray(ds.train), np.asarray(ds.validation)])
    assert int((stream == byte.eot_id).sum()) == 2  # one after each document, none from the literal text
    assert bytes(stream[stream < 256].astype(np.uint8)).count(b"<|endoftext|>") == 50
    assert list(corpus.encode_documents(["a<|endoftext|>b"], byte))[0].tolist() == list(b"a<|endoftext|>b") + [256]
    assert byte.encode("a<|endoftext|>b") == [97, 256, 98]  # prompts may still name the special token


def test_tiny_shakespeare_as_a_local_file(tmp_path, shakespeare_path):
    tok = tokenizers.char_level(shakespeare_path.read_text())
    ds = data.load(str(shakespeare_path), tok, data_dir=tmp_path / "d")
    assert (len(ds.train), len(ds.validation)) == (1_003_854 + 1, 111_540 + 1)  # nanoGPT's 90/10 split + EOT
    assert tok.decode(ds.validation[:-1]) == shakespeare_path.read_text()[1_003_854:]
    assert ds.bytes_per_token == pytest.approx(111_540 / 111_541)


@pytest.fixture(scope="module")
def default_corpus(tmp_path_factory):
    return data.load("default", counting_byte_level(), data_dir=tmp_path_factory.mktemp("default"))


def test_default_corpus_is_the_stdlib_plus_pydoc_topics(default_corpus):
    root, files = sources.stdlib_files()
    names = {f.relative_to(root).as_posix() for f in files}
    assert "argparse.py" in names and "asyncio/events.py" in names
    assert not any(n.startswith(("encodings/", "idlelib/")) or "/test/" in n or n.startswith("test/") for n in names)
    stats = default_corpus.stats["splits"]
    docs = stats["train"]["documents"] + stats["validation"]["documents"]
    assert docs == len(files) + len(sources._pydoc_topics())
    assert sources.default_corpus().total_bytes == stats["train"]["bytes"] + stats["validation"]["bytes"] > 5_000_000
    for split in ("train", "validation"):  # byte-level: one token per byte plus one EOT per document
        assert stats[split]["tokens"] == stats[split]["bytes"] + int((getattr(default_corpus, split) == EOT).sum())
    non_empty = sum(f.stat().st_size > 0 for f in files) + sum(bool(v) for v in sources._pydoc_topics().values())
    assert int((default_corpus.train == EOT).sum() + (default_corpus.validation == EOT).sum()) == non_empty
    topics = sources._pydoc_topics()
    if topics:
        stream = bytes(np.asarray(default_corpus.train[default_corpus.train < 256], np.uint8))
        stream += bytes(np.asarray(default_corpus.validation[default_corpus.validation < 256], np.uint8))
        assert topics["assert"].encode() in stream
    sampler = data.Batches(default_corpus.train, 256, 32, seed=0)
    assert sampler.batch(10**6)["tokens"].shape == (32, 257)


def test_default_corpus_key_is_deterministic(default_corpus):
    assert default_corpus.key.startswith(sources.default_corpus().key + "/")
    assert default_corpus.key.split("/")[1].startswith(f"py{sys.version_info.major}_{sys.version_info.minor}_")


def test_data_args():
    import argparse

    parser = argparse.ArgumentParser()
    data.add_data_args(parser)
    assert vars(parser.parse_args([])) == {"data": "default", "data_dir": None}
    assert vars(parser.parse_args(["--data", "tfds:lm1b", "--data-dir", "/x"])) == {"data": "tfds:lm1b", "data_dir": "/x"}


def test_data_dir_default(monkeypatch, tmp_path):
    monkeypatch.setenv("AIGC_DATA_DIR", str(tmp_path / "env"))
    assert data.default_data_dir() == tmp_path / "env"
    monkeypatch.delenv("AIGC_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_data_dir() == tmp_path / "xdg" / "aigc_jax" / "datasets"


def test_tokenizer_hash_survives_save_and_load(tmp_path):
    # A resumed run reloads the tokenizer from its workdir; it must find the same token cache.
    for i, tok in enumerate([tokenizers.byte_level(), tokenizers.char_level("abc d"),
                             tokenizers.train_bpe(["hello world"] * 5, 300)]):
        tok.save(tmp_path / str(i))
        assert data.tokenizer_hash(tokenizers.load(tmp_path / str(i))) == data.tokenizer_hash(tok)
    assert data.tokenizer_hash(tokenizers.byte_level()) != data.tokenizer_hash(tokenizers.char_level("abc d"))


def test_text_the_tokenizer_cannot_encode_is_a_user_error(tmp_path):
    (tmp_path / "a.txt").write_text("abcabc\nabd\n")
    with pytest.raises(UserError, match="cannot encode text.*'d'"):
        data.load(str(tmp_path / "a.txt"), tokenizers.char_level("abc\n"), data_dir=tmp_path / "d")
    assert not list((tmp_path / "d").rglob("meta.json"))
