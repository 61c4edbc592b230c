"""Prompt→completion examples from JSONL: one `{"prompt": str, "completion": str}` object per line.

Each example is tokenized as prompt + completion + EOT and trained one per row, right-padded: the loss covers the
completion tokens and the EOT, never the prompt or the padding, and attention never crosses examples (no
packing). An example with an empty prompt has no context for its first completion token, so that one token is
not trained.

The prompt's ids are exactly what `generate` feeds for the same text (aigc_jax/prompts.py: HF's `tokenizer(text)`,
so a Llama or Mistral prompt starts with its BOS), so a fine-tuned model sees at inference what it saw in
training. The completion is ordinary text (a literal "<|endoftext|>" in it is characters), tokenized as it reads
after the prompt: the ids of prompt + completion past the prompt's, when they begin with the prompt's ids (a
SentencePiece completion " 4" is then "▁4", as the model would generate it, not "▁▁4"); otherwise on its own.
Validation: the hash rule of `sources.py` applied to each example's content (duplicates stay together).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aigc_jax.data import cache, sources
from aigc_jax.errors import UserError
from aigc_jax.prompts import Prompter


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
        prompts, completions = _tokenize(tokenizer, chosen)
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


def _tokenize(tokenizer, pairs: list[tuple[str, str]]) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids as `generate` encodes them, completion ids as they read after the prompt)."""
    prompts = Prompter(tokenizer).encode_batch([p for p, _ in pairs])
    alone = tokenizer.encode_ordinary_batch([c for _, c in pairs])
    joined = tokenizer.encode_ordinary_batch([p + c for p, c in pairs])  # no BOS: compare past the prompt's
    bos = tokenizer.bos_id
    completions = []
    for p, j, a in zip(prompts, joined, alone):
        body = p[1:] if p and bos is not None and p[0] == bos else p
        completions.append(j[len(body):] if j[: len(body)] == body else a)
    return prompts, completions


def from_cache(arrays: dict[str, np.ndarray], split: str) -> Examples:
    return Examples(arrays[f"{split}_tokens"], arrays[f"{split}_starts"], arrays[f"{split}_prompt_lens"])
