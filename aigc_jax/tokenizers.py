"""Tokenizers, all backed by HF `tokenizers` (no hand-written BPE).

- `byte_level()`: 256 byte ids (id == byte value) + `<|endoftext|>` = 257; any text, no training.
- `char_level(text)`: one id per distinct character (nanoGPT's shakespeare_char), + `<|endoftext|>`.
- `gpt2_bpe(...)` / `load(dir)`: GPT-2 byte-level BPE from vocab.json+merges.txt, tokenizer.json, or OpenAI's
  encoder.json+vocab.bpe; `load(dir)` also reads any HF fast tokenizer's tokenizer.json (byte-level BPE as in
  Llama 3 / Qwen2, SentencePiece-converted BPE as in Llama 2 / Mistral) with its special tokens from
  tokenizer_config.json, its EOS ids from generation_config.json and its chat template.
- `train_bpe(texts, vocab_size)`: a byte-level BPE trained on a corpus.

Every tokenizer is saved as a `tokenizer.json` that `load()` restores exactly (plus tokenizer_config.json,
generation_config.json and chat_template.jinja when it has more than GPT-2's `<|endoftext|>` to say), and its
end-of-text token separates documents.

Over 300 lines because reading an HF tokenizer dir (special tokens, add-BOS/EOS flags, EOS ids, chat template) is
part of what `Tokenizer` is: its save and its load are written together so that one restores the other exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from aigc_jax import chat, fileio
from aigc_jax.errors import UserError

EOT = "<|endoftext|>"
FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
GENERATION_FILE = "generation_config.json"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")  # what a chat template may read


class Tokenizer:
    """A thin, picklable-by-path wrapper: ids in, text out, plus the end-of-text id.

    `eot_token` ends a document (HF's eos_token); `eos_ids` are every id that ends a generation (the end-of-text
    id first, then generation_config.json's, e.g. Llama 3 Instruct's <|eot_id|>); `special_tokens` are the
    bos/eos/unk/pad strings HF hands a chat template; `chat_template` is the model's Jinja chat template or None;
    `generation` holds generation_config.json's decoding settings (do_sample, temperature, top_p, …: the keys
    `decode.config.from_hf` reads), the model's defaults for `generate`.
    """

    def __init__(self, hf: tokenizers.Tokenizer, eot_token: str = EOT, *, special_tokens: dict | None = None,
                 eos_ids: Sequence[int] = (), chat_template: str | None = None, generation: dict | None = None):
        self.hf = hf
        eot_id = hf.token_to_id(eot_token)
        if eot_id is None:
            raise UserError(f"tokenizer has no {eot_token!r} token; add it as a special token")
        self.eot_token, self.eot_id = eot_token, eot_id
        self.special_tokens = {k: v for k, v in {**(special_tokens or {}), "eos_token": eot_token}.items() if v}
        self.eos_ids = tuple(dict.fromkeys([eot_id, *map(int, eos_ids)]))
        self.chat_template = chat_template
        self.generation = dict(generation or {})

    @property
    def bos_id(self) -> int | None:
        bos = self.special_tokens.get("bos_token")
        return None if bos is None else self.hf.token_to_id(bos)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; add_special_tokens=True adds what HF's `tokenizer(text)` adds (Llama: BOS)."""
        return self.encode_batch([text], add_special_tokens)[0]

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        if isinstance(texts, str):
            raise UserError("encode_batch takes a list of strings; for one string use encode")
        texts = list(texts)
        # A list given to encode would otherwise be taken as pre-split words and come back as one joined sequence.
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise UserError(f"can only encode text (str), got {type(bad).__name__} {bad!r:.60}")
        try:
            return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=add_special_tokens)]
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
        """Writes tokenizer.json; and, for a tokenizer with more than GPT-2's `<|endoftext|>` to say, its special
        tokens (tokenizer_config.json), EOS ids and decoding defaults (generation_config.json) and chat template
        (chat_template.jinja)."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, FILE)
        fileio.atomic_save(path, self.hf.save)
        side = {CONFIG_FILE: self.special_tokens if self.special_tokens != {"eos_token": EOT} else None,
                GENERATION_FILE: self.generation_config()}
        for name, data in side.items():
            if data is not None:
                fileio.atomic_write_json(os.path.join(directory, name), data)
            elif os.path.isfile(os.path.join(directory, name)):  # an earlier tokenizer's: it would be read as ours
                os.remove(os.path.join(directory, name))
        template = os.path.join(directory, chat.TEMPLATE_FILE)
        if self.chat_template is not None:
            chat.save_template(os.fspath(directory), self.chat_template)
        elif os.path.isfile(template):
            os.remove(template)
        return path

    def generation_config(self) -> dict | None:
        """generation_config.json's content for this tokenizer: None when it has nothing beyond GPT-2's defaults."""
        eos = {"eos_token_id": list(self.eos_ids)} if self.eos_ids != (self.eot_id,) else {}
        return {**eos, **self.generation} or None

    def render_chat(self, messages, add_generation_prompt: bool = True, template: str | None = None,
                    **kwargs) -> str:
        """The prompt text of `messages` as HF's apply_chat_template renders it (see aigc_jax/chat.py), with this
        tokenizer's special-token strings; `template` replaces the tokenizer's own."""
        template = template if template is not None else self.chat_template
        if template is None:
            raise UserError("this model has no chat template (chat_template.jinja or tokenizer_config.json's "
                            "chat_template); give one, or use plain prompts")
        return chat.render(template, messages, add_generation_prompt=add_generation_prompt,
                           special_tokens=self.special_tokens, **kwargs)

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
        config = _read_json(os.path.join(directory, CONFIG_FILE))
        special = {k: _token_text(config.get(k)) for k in SPECIAL_TOKENS}
        if config.get("tokenizer_class") in ("LlamaTokenizer", "LlamaTokenizerFast"):
            _llama_pipeline(hf, config)
        _apply_add_flags(hf, config, special)
        eot = special["eos_token"] or EOT
        generation = _read_json(os.path.join(directory, GENERATION_FILE))
        return Tokenizer(hf, eot, special_tokens=special, eos_ids=_eos_ids(generation.get("eos_token_id")),
                         chat_template=chat.load_template(directory), generation=_decoding_settings(generation))
    for vocab, merges in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
        if os.path.isfile(os.path.join(directory, vocab)):
            tokenizer = gpt2_bpe(os.path.join(directory, vocab), os.path.join(directory, merges))
            tokenizer.generation = _decoding_settings(_read_json(os.path.join(directory, GENERATION_FILE)))
            return tokenizer
    raise UserError(
        f"no tokenizer in {directory}: expected tokenizer.json, vocab.json + merges.txt, or encoder.json + vocab.bpe"
    )


def _read_json(path: str) -> dict:
    """An optional HF side file: {} when absent; unreadable is an error naming it."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, OSError) as e:
        raise UserError(f"{path} is corrupt ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is corrupt (expected a JSON object)")
    return data


def _token_text(token) -> str | None:
    # tokenizer_config.json names a token by its text or as an AddedToken object {"content": ...}.
    return token.get("content") if isinstance(token, dict) else token


def _eos_ids(value) -> list[int]:
    ids = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise UserError(f"{GENERATION_FILE}: eos_token_id must be an int or a list of ints, got {value!r}")
    return ids


# The decoding keys of generation_config.json that `generate` reads as the model's defaults (decode/config.py).
GENERATION_KEYS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens",
                   "min_new_tokens", "num_beams", "num_return_sequences", "length_penalty", "early_stopping")


def _decoding_settings(generation: dict) -> dict:
    """The decoding keys of generation_config.json (null values dropped), checked to be numbers or booleans."""
    settings = {k: v for k, v in generation.items() if k in GENERATION_KEYS and v is not None}
    for k, v in settings.items():
        ok = isinstance(v, bool) if k == "do_sample" else v == "never" or isinstance(v, (int, float))
        if not ok:
            raise UserError(f"{GENERATION_FILE}: {k} must be a {'boolean' if k == 'do_sample' else 'number'}, "
                            f"got {v!r}")
    return settings


def _llama_pipeline(hf: tokenizers.Tokenizer, config: dict) -> None:
    """transformers 5's LlamaTokenizer (Llama 2, Mistral) keeps tokenizer.json's vocabulary, merges and
    post-processor but rebuilds the rest: Metaspace instead of older files' Prepend("▁") normalizer (which differs
    on text that starts with a space), prefixing per `add_prefix_space` and `legacy`. Do the same, so ids match."""
    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
    scheme = ("always" if config.get("legacy", False) else "first") if add_prefix_space else "never"
    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    hf.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if add_prefix_space else []))


def _apply_add_flags(hf: tokenizers.Tokenizer, config: dict, special: dict) -> None:
    """tokenizer_config.json's explicit add_bos_token / add_eos_token rebuild the post-processor, as transformers'
    `update_post_processor` does; without them tokenizer.json's own post-processor stands."""
    if "add_bos_token" not in config and "add_eos_token" not in config:
        return
    ends = [(special["bos_token"], config.get("add_bos_token", False)), (special["eos_token"],
                                                                          config.get("add_eos_token", False))]
    (bos, add_bos), (eos, add_eos) = [(t, bool(add) and t is not None and hf.token_to_id(t) is not None)
                                      for t, add in ends]
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    used = [t for t, add in ((bos, add_bos), (eos, add_eos)) if add]
    hf.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                      special_tokens=[(t, hf.token_to_id(t)) for t in used])


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
