"""One path from what a user gives (text, token ids or chat messages) to prompt ids, and from generated ids back to
text. The Python API, `aigc-jax generate`, the server and fine-tuning data all go through it, so a model sees the
same input however it is asked, and the same text comes back.

- text → ids as HF's `tokenizer(text)`: with the special tokens the tokenizer adds (Llama's and Mistral's BOS).
- messages → the chat template rendered as `apply_chat_template(messages, add_generation_prompt=True, tools=…,
  documents=…)` with the tokenizer's bos/eos/unk/pad strings, tokenized with nothing added (the template writes
  the special tokens itself).
- stop ids: the tokenizer's end-of-text and every id of generation_config.json's `eos_token_id` list.
- ids → text: a continuation is decoded after the last few prompt tokens and cut where the prompt's text ends, as
  vLLM and TGI do, so a SentencePiece word keeps its leading space (`"Hello"` → `" world"`, not `"world"`), and a
  character split between prompt and continuation is whole. `TextStream` releases it piece by piece; the pieces
  add up exactly to the final text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence


CONTEXT_TOKENS = 8  # prompt tokens decoded before a continuation: enough for a split UTF-8 character (≤ 4 bytes)
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's byte-fallback tokens


class Prompter:
    """A tokenizer's (and chat template's) view of prompts: `encode`, `chat`, `stop_ids`, `continuation`,
    `text_stream`. `chat_template` overrides the tokenizer's own (e.g. `serve --chat-template FILE`)."""

    def __init__(self, tokenizer, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template if chat_template is not None else tokenizer.chat_template
        self._unstable: frozenset[int] | None = None

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return self.tokenizer.eos_ids

    def encode(self, text: str) -> list[int]:
        """A text prompt's ids, as HF's `tokenizer(text)` gives them (with the BOS a Llama tokenizer adds)."""
        return self.tokenizer.encode(text, add_special_tokens=True)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer.encode_batch(texts, add_special_tokens=True)

    def prompt(self, prompt: str | Sequence[int]) -> list[int]:
        """Text is encoded; token ids are taken as they are (the caller chose them, BOS or not)."""
        return self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]

    def render_chat(self, messages, tools=None, documents=None, **template_kwargs) -> str:
        return self.tokenizer.render_chat(messages, template=self.chat_template, tools=tools, documents=documents,
                                          **template_kwargs)

    def chat(self, messages, tools=None, documents=None, **template_kwargs) -> list[int]:
        """The ids of `messages` with the assistant's turn opened, as apply_chat_template(messages,
        add_generation_prompt=True, tokenize=True) gives them."""
        return self.tokenizer.encode(self.render_chat(messages, tools, documents, **template_kwargs))

    @property
    def unstable_ids(self) -> frozenset[int]:
        """Byte-fallback tokens: the text of a run of them can change as the run grows (a byte may complete a
        character, or turn the whole run into replacement characters), so streamed text waits until it ends."""
        if self._unstable is None:
            vocab = self.tokenizer.hf.get_vocab(with_added_tokens=False)
            self._unstable = frozenset(i for piece, i in vocab.items() if _BYTE_PIECE.fullmatch(piece))
        return self._unstable

    def continuation(self, prompt: Sequence[int], ids: Sequence[int]) -> str:
        """The text of `ids` read after `prompt`."""
        return continuation_decoder(self.tokenizer.decode, prompt)(ids)

    def text_stream(self, prompt: Sequence[int], stop: Sequence[str] = ()) -> TextStream:
        return TextStream(continuation_decoder(self.tokenizer.decode, prompt), stop, self.unstable_ids)


def continuation_decoder(decode: Callable[[Sequence[int]], str], prompt: Sequence[int]) -> Callable:
    """ids → their text after the prompt: decode(context + ids) past the longest prefix it shares with
    decode(context). Where the two part ways early, a character was split between prompt and continuation (or a
    decoder joined them); it then belongs to the continuation."""
    context = list(prompt[-CONTEXT_TOKENS:])
    before = decode(context)

    def text_of(ids: Sequence[int]) -> str:
        full = decode(context + list(ids))
        if full.startswith(before):
            return full[len(before):]
        n = 0
        for a, b in zip(before, full):
            if a != b:
                break
            n += 1
        return full[n:]

    return text_of


class TextStream:
    """The text of one generated sequence, released piece by piece.

    Decoding a prefix of the ids can end inside a UTF-8 character (held back while it ends in U+FFFD), inside a
    run of byte-fallback tokens (`unstable`: held back until the run ends), or with the start of a stop string
    (held back until more tokens decide). Released text is therefore a prefix of every later decoding, and the
    pieces add up to `text`. A stop string ends the text before it (OpenAI leaves the stop sequence out)."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = (),
                 unstable: frozenset[int] = frozenset()):
        self.decode, self.stop, self.unstable = decode, [s for s in stop if s], unstable
        self.ids: list[int] = []
        self.sent = 0  # characters released so far
        self.text = ""  # the text released so far
        self.stopped = False
        self._hold = max(map(len, self.stop), default=1) - 1

    def add(self, ids: Sequence[int]) -> str:
        """New text released by `ids`. When a stop string appears, `stopped` is set, `ids` ends at the token that
        completed it and nothing more comes."""
        if self.stopped:
            return ""
        if not self.stop:
            self.ids.extend(ids)
            stable = self._stable()
            return self._release(stable, len(stable))
        pieces = []
        for t in ids:  # token by token: the stop string must end the text at the right token
            self.ids.append(t)
            text = self.decode(self.ids)
            start = max(0, self.sent - self._hold)
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                pieces.append(self._release(text, min(hits)))
                break
            stable = self._stable(text)
            pieces.append(self._release(stable, len(stable) - self._hold))
        return "".join(pieces)

    def finish(self) -> str:
        """The rest of the text once the sequence ended (a trailing partial character shows as U+FFFD, as HF)."""
        if self.stopped:
            return ""
        text = self.decode(self.ids)
        return self._release(text, len(text))

    def _stable(self, text: str | None = None) -> str:
        """The text no later token can change: up to the last token outside a trailing byte-fallback run, without a
        trailing partial character."""
        end = len(self.ids)
        while end and self.ids[end - 1] in self.unstable:
            end -= 1
        if text is None or end < len(self.ids):
            text = self.decode(self.ids[:end]) if end else ""
        return text.rstrip("\ufffd")

    def _release(self, text: str, upto: int) -> str:
        upto = max(upto, self.sent)
        piece, self.sent = text[self.sent:upto], upto
        self.text = self.text + piece
        return piece
