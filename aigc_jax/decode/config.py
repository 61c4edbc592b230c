"""What to generate (`GenerationConfig`, checked with one-line errors) and the shape buckets that bound recompiles.

Buckets (so a new prompt or a new max_new_tokens rarely recompiles):

- prompt length P: the longest prompt of the batch, rounded up to a power of two, at least 16, at most n_positions;
  shorter prompts are left-padded.
- new tokens N (the token buffer and loop bound): max_new_tokens rounded up the same way; the loop stops at the
  traced max_new_tokens, so every value in a bucket shares one executable.
- KV-cache slots S = P + N. Slots are not positions (positions come from the padding mask), so S may exceed
  n_positions without harm.
- batch: rounded up to a power of two, then to a multiple of the device count; filler rows start finished.

One executable per (strategy, batch bucket, P, N): e.g. prompts of 1..16 tokens with 1..16 new tokens all share one.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import secrets
from typing import Literal

from aigc_jax.errors import UserError
from aigc_jax.tokenizers import GENERATION_KEYS

EarlyStopping = bool | Literal["never"]
MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """The knobs of HF's `generate`, with the same meaning. temperature=0 is greedy; num_beams>1 is beam search.

    These defaults are for a model without a generation_config.json: greedy, as HF's own default (do_sample=False).
    `aigc_jax.api` starts from the model's generation_config.json when it has one (`from_hf`), and explicit
    arguments override it. One difference from HF remains: sampling without top_k samples from the whole
    vocabulary (HF samples with top_k=50 unless told otherwise); pass top_k=50 to reproduce HF's default sampling.
    """

    max_new_tokens: int = 32
    min_new_tokens: int = 0  # EOS ids are suppressed until this many tokens were generated
    temperature: float = 0.0  # 0 = greedy (argmax); > 0 = sampling
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off; else ids less likely than min_p x the most likely one's probability are removed
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages ids already in the prompt or the output (also beams)
    num_beams: int = 1
    num_return_sequences: int = 1  # sequences per prompt (rows p*n + j, as HF): sampling, or the n best beams
    length_penalty: float = 1.0  # beam score = sum of log-probs / generated_length ** length_penalty
    early_stopping: EarlyStopping = False  # beam search: True, False or "never", as in HF
    eos_ids: tuple[int, ...] = ()  # a row finishes at any of these; () or None = never; one int = (int,) as in HF
    pad_id: int | None = None  # emitted by finished rows; default eos_ids[0] (HF with pad_token_id=eos), else 0
    seed: int | None = None  # sampling seed; None = a fresh one per call (see `with_seed`), as HF draws afresh
    stop_strings: tuple[str, ...] = ()  # the text ends before the first of these (aigc_jax.api: needs the tokenizer)
    logprobs: bool = False  # also return each generated token's log-probability (raw log-softmax of the logits)

    def __post_init__(self):
        # NumPy/JAX integers (e.g. a length computed with numpy) count as ints; eos_ids takes HF's int | list | None.
        for f in ("max_new_tokens", "min_new_tokens", "top_k", "num_beams", "num_return_sequences", "pad_id", "seed"):
            object.__setattr__(self, f, as_int(getattr(self, f)))
        if isinstance(self.stop_strings, str):  # HF's stop_strings may be one string
            object.__setattr__(self, "stop_strings", (self.stop_strings,))
        elif isinstance(self.stop_strings, (list, tuple)):
            object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        eos = self.eos_ids
        eos = () if eos is None else (eos,) if _is_int(as_int(eos)) else eos
        if not isinstance(eos, (str, bytes)) and hasattr(eos, "__iter__"):
            object.__setattr__(self, "eos_ids", tuple(as_int(i) for i in eos))

    def replace(self, **changes) -> "GenerationConfig":
        return dataclasses.replace(self, **changes)

    def with_seed(self) -> "GenerationConfig":
        """This config with a concrete seed: the given one, or a fresh random one to report with the result."""
        return self if self.seed is not None else self.replace(seed=secrets.randbits(31))

    @property
    def pad(self) -> int:
        if self.pad_id is not None:
            return self.pad_id
        return self.eos_ids[0] if self.eos_ids else 0

    def check(self, n_positions: int, vocab_size: int, prompt_lengths: list[int] | None = None) -> None:
        """Raises a one-line UserError naming the flag for anything HF's generate would also reject."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not _is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            raise UserError(f"--min-new-tokens must be a non-negative integer, got {self.min_new_tokens!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise UserError(f"--temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise UserError(f"--top-k must be a non-negative integer (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not (isinstance(self.min_p, numbers.Real) and 0 <= self.min_p <= 1):
            raise UserError(f"--min-p must be in [0, 1] (0 = off), got {self.min_p!r}")
        if not (isinstance(self.repetition_penalty, numbers.Real) and 0 < self.repetition_penalty < math.inf):
            raise UserError(f"--repetition-penalty must be a finite number > 0 (1 = off), "
                            f"got {self.repetition_penalty!r}")
        if not _is_int(self.num_beams) or self.num_beams < 1:
            raise UserError(f"--num-beams must be an integer >= 1, got {self.num_beams!r}")
        self._check_sequences()
        if self.seed is not None and not _is_int(self.seed):
            raise UserError(f"--seed must be an integer (or None for a fresh one), got {self.seed!r}")
        if not (isinstance(self.length_penalty, numbers.Real) and math.isfinite(self.length_penalty)):
            raise UserError(f"--length-penalty must be a finite number, got {self.length_penalty!r}")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise UserError(f"--early-stopping must be true, false or never, got {self.early_stopping!r}")
        if self.num_beams > 1 and (self.top_k or self.top_p < 1 or self.min_p or self.temperature not in (0, 1)):
            raise UserError("beam sampling is not supported: with --num-beams > 1 drop "
                            "--temperature/--top-k/--top-p/--min-p")
        if not isinstance(self.eos_ids, tuple):
            raise UserError(f"eos ids must be an int or a list of ints, got {self.eos_ids!r}")
        for name, ids in (("eos id", self.eos_ids), ("pad id", () if self.pad_id is None else (self.pad_id,))):
            bad = [i for i in ids if not _is_int(i) or not 0 <= i < vocab_size]
            if bad:
                raise UserError(f"{name} {bad[0]!r} is outside the vocabulary [0, {vocab_size})")
        for i, n in enumerate(prompt_lengths or []):
            if n == 0:
                raise UserError(f"prompt {i} is empty: give at least one token of text")
            # As in HF: the last new token is never fed back, so prompt + max_new_tokens - 1 positions must fit.
            if n > n_positions:
                raise UserError(
                    f"prompt {i} has {n} tokens, more than the model's context of {n_positions} tokens: shorten it "
                    f"to at most {n_positions} tokens"
                )
            if n + self.max_new_tokens - 1 > n_positions:
                raise UserError(
                    f"prompt {i} has {n} tokens; with --max-new-tokens {self.max_new_tokens} that exceeds the "
                    f"model's context of {n_positions} tokens (use at most {n_positions - n + 1} new tokens)"
                )

    def _check_sequences(self) -> None:
        n = self.num_return_sequences
        if not _is_int(n) or n < 1:
            raise UserError(f"--num-return-sequences must be an integer >= 1, got {n!r}")
        if n > 1 and self.strategy_kind == "greedy":
            raise UserError(f"greedy decoding has one answer per prompt: --num-return-sequences {n} needs sampling "
                            f"(--temperature > 0) or beam search (--num-beams >= {n})")
        if self.strategy_kind == "beam" and n > self.num_beams:
            raise UserError(f"--num-return-sequences {n} is more than the {self.num_beams} beams: "
                            f"use --num-beams >= {n}")
        if not all(isinstance(s, str) and s for s in self.stop_strings) or not isinstance(self.stop_strings, tuple):
            raise UserError(f"stop strings must be non-empty strings, got {self.stop_strings!r}")
        if not isinstance(self.logprobs, bool):
            raise UserError(f"logprobs must be True or False, got {self.logprobs!r}")

    @property
    def is_sampling(self) -> bool:
        return self.strategy_kind == "sample"

    @property
    def strategy_kind(self) -> str:
        if self.num_beams > 1:
            return "beam"
        return "greedy" if self.temperature == 0 else "sample"


# generation_config.json keys that `from_hf` reads (the ones with a GenerationConfig counterpart).
HF_KEYS = GENERATION_KEYS  # the decoding keys of generation_config.json
_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p")


def from_hf(hf: dict) -> dict:
    """The GenerationConfig fields a model's generation_config.json sets, as HF's `generate` reads it: greedy
    unless do_sample is true (a greedy config's sampling keys are ignored, as HF ignores them); when sampling,
    temperature defaults to 1 and top_k to 50 (HF's defaults). Absent or null keys are left out, so the caller's
    defaults apply to them."""
    given = {k: v for k, v in hf.items() if k in HF_KEYS and v is not None}
    out = {k: v for k, v in given.items() if k not in (*_SAMPLING_KEYS, "do_sample")}
    if given.get("do_sample") is True:
        out.update({"temperature": 1.0, "top_k": 50, **{k: given[k] for k in _SAMPLING_KEYS if k in given}})
    return out


@dataclasses.dataclass(frozen=True)
class Features:
    """Which token-selection work is compiled in at all (sampling.select reads it at trace time): a sort, a second
    softmax or a [rows, vocab] mask of the ids seen is paid for only when switched on. Offline generation compiles
    one program per combination; the server compiles one with everything it offers and skips per step (lax.cond)."""

    sample: bool = False  # draw tokens; False: argmax for every row
    mixed: bool = False  # each row is greedy or samples (knobs.greedy); sampling runs only while a live row samples
    top_k: bool = False
    top_p: bool = False
    min_p: bool = False
    penalty: bool = False  # the loop state carries a [rows, vocab] mask of the ids seen
    logprobs: bool = False  # the chosen tokens' log-probabilities are computed


@dataclasses.dataclass(frozen=True)
class Strategy:
    """The static (compile-time) part of a GenerationConfig; everything numeric travels as traced `Knobs`."""

    kind: str  # "greedy" | "sample" | "beam"
    features: Features = Features()
    n_eos: int = 1
    num_beams: int = 1
    num_return: int = 1  # beam search: the best num_return hypotheses of each prompt (sampling repeats rows)

    @classmethod
    def of(cls, gen: GenerationConfig) -> "Strategy":
        kind = gen.strategy_kind
        sample = kind == "sample"
        features = Features(
            sample=sample,
            top_k=sample and gen.top_k > 0,
            top_p=sample and gen.top_p < 1,
            min_p=sample and gen.min_p > 0,
            penalty=gen.repetition_penalty != 1,
            logprobs=gen.logprobs,
        )
        return cls(
            kind=kind,
            features=features,
            n_eos=max(1, len(gen.eos_ids)),  # see make_knobs: no EOS is encoded as one impossible id
            num_beams=gen.num_beams if kind == "beam" else 1,
            num_return=gen.num_return_sequences if kind == "beam" else 1,
        )


def bucket(n: int, limit: int | None = None) -> int:
    """n rounded up to a power of two, at least MIN_BUCKET, at most `limit` (but never below n)."""
    b = MIN_BUCKET
    while b < n:
        b *= 2
    return max(n, min(b, limit)) if limit else b


def batch_bucket(n: int, n_devices: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return -(-b // n_devices) * n_devices


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def as_int(x):
    """x as a Python int if it is an integer of any kind (NumPy, 0-d arrays), else unchanged for check() to reject."""
    if isinstance(x, bool) or _is_int(x):
        return x
    if isinstance(x, numbers.Integral):
        return int(x)
    if getattr(x, "shape", None) == () and getattr(getattr(x, "dtype", None), "kind", None) in ("i", "u"):
        return int(x)
    return x
