"""What `logprobs` reports for each token: its string and exact bytes, and character offsets. (A sequence's text,
streamed with stop strings, comes from aigc_jax/prompts.py, as offline generation's does.)"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import decoders


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
        self._special = set(tokenizer.hf.get_added_tokens_decoder())  # e.g. BOS, <|eot_id|>: not byte-mapped

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
