"""Prompt→completion examples from JSONL: one `{"prompt": str, "completion": str}` object per line.

Each example is tokenized as prompt + completion + EOT (prompt and completion separately, so the boundary
between them is exact) and trained one per row, right-padded: the loss covers the completion tokens and
the EOT, never the prompt or the padding, and attention never crosses examples (no packing). An example
with an empty prompt has no context for its first completion token, so that one token is not trained.
Validation: the hash rule of `sources.py` applied to each example's content (duplicates stay together).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aigc_jax.data import cache, sources
from aigc_jax.errors import UserError


@dataclass(frozen=True)
class Examples:
    """Examples stored flat: example i is tokens[starts[i]:starts[i+1]], its first prompt_lens[i] the prompt."""

    tokens: np.ndarray
    starts: np.ndarray  # int64 [n + 1]
    prompt_lens: np.ndarray  # int64 [n]

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.starts[i] : self.starts[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.starts)


def read_jsonl(path: str) -> list[tuple[str, str]]:
    """(prompt, completion) pairs; blank lines are skipped; anything else malformed is a one-line error."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in ("prompt", "completion")):
                got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise UserError(f"{path}:{lineno}: expected an object with string 'prompt' and 'completion', got {got}")
            pairs.append((obj["prompt"], obj["completion"]))
    if not pairs:
        raise UserError(f"{path}: no examples (the file is empty)")
    return pairs


def build(source: sources.Source, tokenizer, tmp: Path) -> dict:
    """Tokenizes a JSONL source into `tmp` for `cache.cached`."""
    pairs = read_jsonl(source.files[0])
    names = [f"{p}\0{c}" for p, c in pairs]
    if len(set(names)) < 2:
        raise UserError(f"{source.files[0]}: need at least 2 distinct examples (one goes to validation)")
    val = sources.validation_names(sorted(set(names)))
    meta = {"source": source.name, "kind": "jsonl", "eot_id": tokenizer.eot_id, "arrays": {}, "splits": {}}
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    for split in ("train", "validation"):
        chosen = [pc for pc, name in zip(pairs, names) if (name in val) == (split == "validation")]
        # Ordinary text, as for corpora: a literal "<|endoftext|>" in an example is not an end of text.
        prompts = tokenizer.encode_ordinary_batch([p for p, _ in chosen])
        completions = tokenizer.encode_ordinary_batch([c for _, c in chosen])
        seqs = [p + c + [tokenizer.eot_id] for p, c in zip(prompts, completions)]
        arrays = {
            "tokens": np.fromiter((t for s in seqs for t in s), dtype=dtype),
            "starts": np.cumsum([0] + [len(s) for s in seqs], dtype=np.int64),
            "prompt_lens": np.array([len(p) for p in prompts], dtype=np.int64),
        }
        for name, array in arrays.items():
            meta["arrays"][f"{split}_{name}"] = cache.write_array(tmp, f"{split}_{name}", array)
        meta["splits"][split] = {
            "examples": len(chosen),
            "tokens": len(arrays["tokens"]),
            "loss_tokens": sum(len(c) + 1 for c in completions),
            "loss_bytes": sum(len(c.encode()) for _, c in chosen),
        }
    meta["bytes_per_token"] = meta["splits"]["validation"]["loss_bytes"] / meta["splits"]["validation"]["loss_tokens"]
    return meta


def from_cache(arrays: dict[str, np.ndarray], split: str) -> Examples:
    return Examples(arrays[f"{split}_tokens"], arrays[f"{split}_starts"], arrays[f"{split}_prompt_lens"])
