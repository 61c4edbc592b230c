"""Tokenizers, all backed by HF `tokenizers` (no hand-written BPE).

- `byte_level()`: 256 byte ids (id == byte value) + `<|endoftext|>` = 257; any text, no training.
- `char_level(text)`: one id per distinct character (nanoGPT's shakespeare_char), + `<|endoftext|>`.
- `gpt2_bpe(...)` / `load(dir)`: GPT-2 byte-level BPE from vocab.json+merges.txt, tokenizer.json, or OpenAI's
  encoder.json+vocab.bpe.
- `train_bpe(texts, vocab_size)`: a byte-level BPE trained on a corpus.

Every tokenizer is saved as a `tokenizer.json` that `load()` restores exactly, and `<|endoftext|>` separates
documents.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from aigc_jax import fileio
from aigc_jax.errors import UserError

EOT = "<|endoftext|>"
FILE = "tokenizer.json"


class Tokenizer:
    """A thin, picklable-by-path wrapper: ids in, text out, plus the end-of-text id."""

    def __init__(self, hf: tokenizers.Tokenizer, eot_token: str = EOT):
        self.hf = hf
        eot_id = hf.token_to_id(eot_token)
        if eot_id is None:
            raise UserError(f"tokenizer has no {eot_token!r} token; add it as a special token")
        self.eot_token, self.eot_id = eot_token, eot_id

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if isinstance(texts, str):
            raise UserError("encode_batch takes a list of strings; for one string use encode")
        texts = list(texts)
        # A list given to encode would otherwise be taken as pre-split words and come back as one joined sequence.
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise UserError(f"can only encode text (str), got {type(bad).__name__} {bad!r:.60}")
        try:
            return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]
        except Exception as e:  # tokenizers raises a bare Exception, e.g. a char vocabulary meeting a new character
            raise UserError(f"cannot encode text: {e}{self._unknown_chars_hint(texts)}") from None

    @property
    def ordinary(self) -> tokenizers.Tokenizer:
        """A copy of the HF tokenizer that encodes special-token strings as plain text (tiktoken's encode_ordinary):
        training text that *contains* "<|endoftext|>" is text, not a document boundary; only the data pipeline
        inserts EOT ids between documents."""
        if getattr(self, "_ordinary", None) is None:
            self._ordinary = tokenizers.Tokenizer.from_str(self.hf.to_str())
            self._ordinary.encode_special_tokens = True
        return self._ordinary

    def encode_ordinary_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Like encode_batch, but special-token strings in the text are ordinary text."""
        try:
            return [e.ids for e in self.ordinary.encode_batch(list(texts), add_special_tokens=False)]
        except Exception:  # tokenizers raises a bare Exception (e.g. a character outside a char-level vocabulary)
            self.encode_batch(texts)  # raises the UserError naming the cause
            raise

    def _unknown_chars_hint(self, texts: Sequence[str]) -> str:
        if not isinstance(self.hf.model, models.WordLevel):
            return ""
        unknown = sorted({c for t in texts for c in t} - set(self.hf.get_vocab()))
        return f" (characters not in the vocabulary: {''.join(unknown[:20])!r})" if unknown else ""

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        try:
            ids = [int(i) for i in ids]
        except TypeError:
            raise UserError("decode takes one sequence of token ids; decode a batch row by row") from None
        bad = next((i for i in ids if not 0 <= i < 2**32), None)
        if bad is not None:  # e.g. -100, the ignore-index of labels; ids >= vocab_size are skipped, as in HF
            raise UserError(f"cannot decode token id {bad}: ids are non-negative (drop -100 label padding first)")
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | os.PathLike) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, FILE)
        fileio.atomic_save(path, self.hf.save)
        return path

    def __repr__(self):
        return f"Tokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


def _byte_level_pipeline(hf: tokenizers.Tokenizer, use_regex: bool) -> tokenizers.Tokenizer:
    # The GPT-2 pipeline: bytes mapped to printable unicode, split by GPT-2's regex, no prefix space.
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    return hf


def byte_level() -> Tokenizer:
    """256 byte tokens whose id is the byte value, then `<|endoftext|>` = 256."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    hf = _byte_level_pipeline(tokenizers.Tokenizer(models.BPE(vocab, [])), use_regex=False)
    hf.add_special_tokens([EOT])
    return Tokenizer(hf)


def char_level(text: str) -> Tokenizer:
    """One id per distinct character of `text`, in sorted order (nanoGPT's shakespeare_char), then EOT."""
    chars = sorted(set(text))
    if not chars:
        raise UserError("cannot build a character vocabulary from empty text")
    hf = tokenizers.Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=None))
    hf.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    hf.add_special_tokens([EOT])
    return Tokenizer(hf)


def gpt2_bpe(vocab_file: str, merges_file: str) -> Tokenizer:
    """GPT-2's tokenizer from vocab.json + merges.txt (HF) or encoder.json + vocab.bpe (OpenAI): same formats."""
    for path in (vocab_file, merges_file):
        if not os.path.isfile(path):
            raise UserError(f"tokenizer file {path} does not exist")
    try:
        bpe = models.BPE.from_file(vocab_file, merges_file)
    except Exception as e:  # tokenizers raises bare Exception on malformed files
        raise UserError(f"cannot read BPE files {vocab_file} / {merges_file}: {e}") from None
    hf = _byte_level_pipeline(tokenizers.Tokenizer(bpe), use_regex=True)
    hf.add_special_tokens([EOT])
    return Tokenizer(hf)


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Trains a GPT-2-style byte-level BPE of `vocab_size` ids (including the 256 bytes and EOT)."""
    if vocab_size < 257:
        raise UserError(f"a byte-level BPE needs vocab_size >= 257 (256 bytes + {EOT}), got {vocab_size}")
    hf = _byte_level_pipeline(tokenizers.Tokenizer(models.BPE()), use_regex=True)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)


def load(directory: str | os.PathLike) -> Tokenizer:
    """Loads tokenizer.json, else vocab.json + merges.txt, else encoder.json + vocab.bpe from `directory`."""
    directory = os.fspath(directory)
    path = os.path.join(directory, FILE)
    if os.path.isfile(path):
        try:
            hf = tokenizers.Tokenizer.from_file(path)
        except Exception as e:
            raise UserError(f"cannot read {path}: {e}") from None
        return Tokenizer(hf, _eot_token(directory))
    for vocab, merges in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
        if os.path.isfile(os.path.join(directory, vocab)):
            return gpt2_bpe(os.path.join(directory, vocab), os.path.join(directory, merges))
    raise UserError(
        f"no tokenizer in {directory}: expected tokenizer.json, vocab.json + merges.txt, or encoder.json + vocab.bpe"
    )


def _eot_token(directory: str) -> str:
    # HF directories name their end-of-text token in tokenizer_config.json; GPT-2's is <|endoftext|>.
    path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                token = json.load(f).get("eos_token", EOT)
            return token["content"] if isinstance(token, dict) else (token or EOT)
        except (ValueError, OSError):
            pass
    return EOT


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character table (the order ByteLevel.alphabet() draws from).
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
