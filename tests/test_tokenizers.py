"""Tokenizers against outside oracles: HF transformers' GPT-2 tokenizer built from the same files, UTF-8 itself."""

import json
import os
import random
import shutil

import pytest

from aigc_jax import tokenizers as tok
from aigc_jax.errors import UserError
from helpers.text import CORPUS, EOT, TEXTS, random_texts
from helpers.tokenizer_styles import hf_gpt2_tokenizer, write_bpe_files

@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return write_bpe_files(tmp_path_factory.mktemp("bpe"))


def _ours_from(source, bpe_dir, tmp_path, oracle):
    if source == "vocab.json+merges.txt":
        return tok.load(bpe_dir)
    if source == "encoder.json+vocab.bpe":  # OpenAI's names for the same two files
        shutil.copy(bpe_dir / "vocab.json", tmp_path / "encoder.json")
        shutil.copy(bpe_dir / "merges.txt", tmp_path / "vocab.bpe")
        return tok.load(tmp_path)
    if source == "tokenizer.json":  # HF's own serialization of its tokenizer
        oracle.save_pretrained(str(tmp_path))
        assert (tmp_path / "tokenizer.json").is_file() and not (tmp_path / "vocab.json").exists()
        return tok.load(tmp_path)
    return tok.gpt2_bpe(str(bpe_dir / "vocab.json"), str(bpe_dir / "merges.txt"))


@pytest.mark.parametrize("source", ["vocab.json+merges.txt", "encoder.json+vocab.bpe", "tokenizer.json", "gpt2_bpe()"])
def test_gpt2_bpe_matches_transformers(source, bpe_dir, tmp_path):
    oracle = hf_gpt2_tokenizer(bpe_dir)
    ours = _ours_from(source, bpe_dir, tmp_path, oracle)
    assert ours.vocab_size == len(oracle)
    assert ours.eot_id == oracle.eos_token_id == len(oracle) - 1
    for text in TEXTS + random_texts(400):
        ids = oracle.encode(text)
        assert ours.encode(text) == ids, repr(text)
        assert ours.decode(ids) == oracle.decode(ids) == text, repr(text)
    assert ours.encode_batch(TEXTS) == [oracle.encode(t) for t in TEXTS]
    # Decoding ids that split a multi-byte character, and dropping the separator on request.
    emoji = oracle.encode("🙂")
    for ids in (emoji[:1], emoji[:-1], emoji + [ours.eot_id] + emoji[1:]):
        assert ours.decode(ids) == oracle.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == oracle.decode(ids, skip_special_tokens=True)


def test_separator_is_one_token_wherever_it_appears(bpe_dir):
    ours = tok.load(bpe_dir)
    ids = ours.encode(f"a{EOT}b {EOT}\n{EOT}")
    assert ids.count(ours.eot_id) == 3
    assert ours.decode(ids, skip_special_tokens=True) == "ab \n"


def test_vocab_without_separator_appends_it_like_transformers(tmp_path):
    write_bpe_files(tmp_path)
    with open(tmp_path / "vocab.json") as f:
        vocab = json.load(f)
    del vocab[EOT]
    with open(tmp_path / "vocab.json", "w") as f:
        json.dump(vocab, f, ensure_ascii=False)
    oracle, ours = hf_gpt2_tokenizer(tmp_path), tok.load(tmp_path)
    assert ours.eot_id == oracle.eos_token_id == len(vocab)
    for text in TEXTS:
        assert ours.encode(text) == oracle.encode(text)


def test_byte_level_ids_are_utf8_bytes():
    bt = tok.byte_level()
    assert (bt.vocab_size, bt.eot_id) == (257, 256)
    for text in TEXTS + random_texts(200, seed=1):
        ids = bt.encode(text)
        assert bt.decode(ids) == text
        if EOT not in text:
            assert ids == list(text.encode("utf-8"))
    assert bt.encode(f"a{EOT}b") == [97, 256, 98]
    # Any byte sequence decodes like Python's UTF-8 decoder with errors="replace".
    rng = random.Random(2)
    for _ in range(300):
        raw = bytes(rng.choice([0x41, 0x20, 0xE6, 0x97, 0xA5, 0xF0, 0x9F, 0x99, 0x82, 0xC3, 0xA9, 0x80, 0xFF, 0xC0])
                    for _ in range(rng.randint(0, 8)))
        assert bt.decode(list(raw)) == raw.decode("utf-8", errors="replace")


def test_char_level_is_sorted_characters():
    text = "".join(CORPUS)
    ct = tok.char_level(text)
    chars = sorted(set(text))
    assert ct.vocab_size == len(chars) + 1 and ct.eot_id == len(chars)
    assert ct.encode(text[:200]) == [chars.index(c) for c in text[:200]]
    for sample in (text, "  a\n\tb 🙂", f"ab{EOT}c", ""):
        assert ct.decode(ct.encode(sample)) == sample
    assert ct.encode(f"a{EOT}") == [chars.index("a"), ct.eot_id]


def test_char_level_unknown_character_is_a_user_error():
    ct = tok.char_level("hello world")
    with pytest.raises(UserError, match="not in the vocabulary: 'y🙂'") as e:
        ct.encode("hey 🙂")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="empty text"):
        tok.char_level("")


def test_train_bpe_has_the_requested_size_and_compresses():
    trained = tok.train_bpe(CORPUS, 450, min_frequency=1)
    assert trained.vocab_size == 450
    assert trained.hf.token_to_id(EOT) == trained.eot_id
    sample = CORPUS[0]
    assert len(trained.encode(sample)) < len(sample.encode("utf-8")) / 2
    assert trained.decode(trained.encode(sample)) == sample
    with pytest.raises(UserError, match="vocab_size >= 257"):
        tok.train_bpe(CORPUS, 256)


@pytest.mark.parametrize("kind", ["byte_level", "char_level", "train_bpe", "gpt2_bpe"])
def test_save_and_load_restore_the_same_tokenizer(kind, bpe_dir, tmp_path):
    original = {
        "byte_level": tok.byte_level,
        "char_level": lambda: tok.char_level("".join(CORPUS)),
        "train_bpe": lambda: tok.train_bpe(CORPUS, 320, min_frequency=1),
        "gpt2_bpe": lambda: tok.load(bpe_dir),
    }[kind]()
    original.save(tmp_path)
    restored = tok.load(tmp_path)
    assert restored.hf.to_str() == original.hf.to_str()
    assert (restored.vocab_size, restored.eot_id) == (original.vocab_size, original.eot_id)
    texts = [t for t in TEXTS if kind != "char_level" or set(t.replace(EOT, "")) <= set("".join(CORPUS))]
    assert restored.encode_batch(texts) == original.encode_batch(texts)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="no tokenizer in"):
        tok.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizer.json"):
        tok.load(tmp_path)
    os.remove(tmp_path / "tokenizer.json")
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(UserError, match="merges.txt does not exist"):
        tok.load(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    (tmp_path / "vocab.json").write_text("[1, 2")
    with pytest.raises(UserError, match="vocab.json"):
        tok.load(tmp_path)
