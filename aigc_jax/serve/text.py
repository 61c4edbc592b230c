"""Token ids → the text a client sees: incremental decoding, stop strings, per-token strings and byte offsets."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tokenizers import decoders


class TextStream:
    """The text of one generated sequence, released piece by piece.

    Decoding a prefix of the ids can end inside a UTF-8 character (byte-level BPE), and the end of the text may be
    the start of a stop string: both are held back until more tokens decide. A stop string ends the text before
    it (OpenAI leaves the stop sequence out)."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()):
        self.decode, self.stop = decode, [s for s in stop if s]
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
            stable = self.decode(self.ids).rstrip("\ufffd")
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
            stable = text.rstrip("\ufffd")
            pieces.append(self._release(stable, len(stable) - self._hold))
        return "".join(pieces)

    def finish(self) -> str:
        """The rest of the text once the sequence ended (a trailing partial character shows as U+FFFD, as HF)."""
        if self.stopped:
            return ""
        text = self.decode(self.ids)
        return self._release(text, len(text))

    def _release(self, text: str, upto: int) -> str:
        upto = max(upto, self.sent)
        piece, self.sent = text[self.sent:upto], upto
        self.text = text[:upto]
        return piece


def _byte_decoder() -> dict[str, int]:
    # GPT-2's byte-level alphabet: each of the 256 bytes has a printable stand-in character.
    from aigc_jax.tokenizers import _bytes_to_unicode

    return {c: b for b, c in _bytes_to_unicode().items()}


class TokenText:
    """Per-token strings and bytes of a tokenizer (what `logprobs` reports for each token)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._byte_level = isinstance(tokenizer.hf.decoder, decoders.ByteLevel)
        self._bytes_of = _byte_decoder() if self._byte_level else {}
        self._special = {tokenizer.eot_id}

    def bytes(self, token_id: int) -> bytes:
        """The exact bytes of one token (byte-level BPE tokens may be part of a UTF-8 character)."""
        piece = self.tokenizer.hf.id_to_token(int(token_id))
        if self._byte_level and piece is not None and token_id not in self._special:
            if all(c in self._bytes_of for c in piece):
                return bytes(self._bytes_of[c] for c in piece)
        return self.tokenizer.decode([token_id]).encode("utf-8")

    def string(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def strings_and_offsets(self, ids: Sequence[int], start: int = 0) -> tuple[list[str], list[int]]:
        """Each token's string and its character offset in the text (offsets count the token strings)."""
        strings, offsets, at = [], [], start
        for t in ids:
            s = self.string(t)
            strings.append(s)
            offsets.append(at)
            at += len(s)
        return strings, offsets
