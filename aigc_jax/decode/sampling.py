"""Next-token selection with HF transformers' semantics, the one implementation offline generation, beam search
and the serving engine share: pure functions on fp32 logits [B, V].

HF applies, in this order: the repetition penalty (over the prompt and the tokens generated so far), EOS
suppression while fewer than `min_new_tokens` were generated, then (sampling only) temperature → top-k → top-p →
min-p, then samples from the softmax (or takes the argmax when greedy). `select` is that order; beam search applies
the first two (`process`) to log-softmax scores, as HF's beam search does. Removed ids get -inf, HF's
`filter_value`, so the filtered logits can be compared with HF's processors.

The knobs arrive as traced values (`Knobs`), so changing temperature/top-k/top-p/min-p/the penalty, EOS ids or
beam settings does not recompile. Per-row knobs are [B] when every row has its own (serving: one request per
row) or [] when one call sets them for all rows (offline generation), broadcast to the rows where they are read.
What is compiled in at all is the static `config.Features`.

A row's draw uses the key (seed, global row, step) (`row_keys`), so its tokens depend neither on the batch it is in
nor on the device count, and a served request with row r draws what offline generation draws for batch row r.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from aigc_jax.decode.config import Features

NEG_INF = -jnp.inf


@flax.struct.dataclass
class Knobs:
    """The numbers of a decode. Per-row fields are [B] or [] (the same for every row); fields a decoder does not
    read are None. Offline generation builds them with `make_knobs`, the serving engine per chunk."""

    # Per row.
    temperature: jax.Array  # f32 > 0 (greedy rows do not read it)
    top_k: jax.Array  # i32; read only with Features.top_k (the vocabulary size keeps every id)
    top_p_threshold: jax.Array  # f32 = 1 - top_p (computed in float64 on the host, as HF's Python float)
    seed: jax.Array  # u32
    greedy: jax.Array | None = None  # bool: the row takes the argmax (read only with Features.mixed)
    min_p: jax.Array | None = None  # f32; read only with Features.min_p
    repetition_penalty: jax.Array | None = None  # f32; read only with Features.penalty
    # The sampling key's row. Offline, None here: the loop passes the batch's global row indices, which are split
    # over devices with the rows while the knobs are replicated.
    row: jax.Array | None = None
    # Shared by every row.
    eos_ids: jax.Array | None = None  # [Strategy.n_eos] i32 (static length); -1 pads "no EOS"
    min_new_tokens: jax.Array | None = None  # [] i32: EOS ids suppressed before this many tokens (None: never)
    # The offline loop's limits and beam search's numbers (the serving engine bounds its rows itself).
    pad_id: jax.Array | None = None  # [] i32, emitted by finished rows
    max_new_tokens: jax.Array | None = None  # [] i32, <= the token-buffer bucket
    length_penalty: jax.Array | None = None  # [] f32
    length_norm: jax.Array | None = None  # [N+1] f32: n ** length_penalty, as HF computes it (float64 -> f32)
    early_stopping_true: jax.Array | None = None  # [] bool: beam search's early_stopping is True
    early_stopping_never: jax.Array | None = None  # [] bool: ... is "never"

    PER_ROW = ("temperature", "top_k", "top_p_threshold", "seed", "greedy", "min_p", "repetition_penalty", "row")

    def first_rows(self, n: int) -> "Knobs":
        """These knobs for rows [0, n) only (per-row fields that are [B]; the rest apply to any rows)."""
        per_row = {f: getattr(self, f) for f in self.PER_ROW}
        return self.replace(**{f: x[:n] for f, x in per_row.items() if x is not None and jnp.ndim(x) == 1})


def make_knobs(gen, n_bucket: int) -> Knobs:
    """Host-side numbers for a `GenerationConfig`, the same for every row; `n_bucket` is the static token-buffer
    length. (A config without a seed gets a fresh one here; callers that report the seed resolve it first with
    `gen.with_seed()`.)"""
    gen = gen.with_seed()
    lengths = np.arange(n_bucket + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):  # 0 ** negative is never read: lengths start at 1
        norm = lengths ** float(gen.length_penalty)
    return Knobs(
        temperature=np.float32(gen.temperature if gen.temperature > 0 else 1.0),
        top_k=np.int32(gen.top_k),
        top_p_threshold=np.float32(1.0 - float(gen.top_p)),
        seed=np.uint32(gen.seed % 2**32),
        min_p=np.float32(gen.min_p),
        repetition_penalty=np.float32(gen.repetition_penalty),
        # No EOS is an id that never occurs (-1), so "no EOS" shares the executable of one EOS id.
        eos_ids=np.asarray(tuple(gen.eos_ids) or (-1,), np.int32),
        min_new_tokens=np.int32(gen.min_new_tokens),
        pad_id=np.int32(gen.pad),
        max_new_tokens=np.int32(gen.max_new_tokens),
        length_penalty=np.float32(gen.length_penalty),
        length_norm=norm.astype(np.float32),
        early_stopping_true=np.bool_(gen.early_stopping is True),
        early_stopping_never=np.bool_(gen.early_stopping == "never"),
    )


# ------------------------------------------------------------------------------------------------ the whole choice


def select(logits_BxV: jax.Array, knobs: Knobs, features: Features, step, seen_BxV: jax.Array | None = None,
           rows_B: jax.Array | None = None, live_B: jax.Array | None = None) -> jax.Array:
    """Each row's next id [B]: `process`, then the argmax or `warp` and a draw with the key (seed, row, step).

    step: tokens the row generated so far ([] or [B]); rows_B: the key's rows (default knobs.row); live_B: the rows
    whose token is used (with Features.mixed the sampling branch runs only when one of them samples, so an
    all-greedy batch pays for the argmax alone)."""
    scores_BxV = process(logits_BxV, knobs, features, step, seen_BxV)
    argmax_B = jnp.argmax(scores_BxV, axis=-1).astype(jnp.int32)
    if not features.sample:
        return argmax_B
    rows_B = knobs.row if rows_B is None else rows_B

    def sampled(_):
        scores = warp(scores_BxV, knobs, features.top_k, features.top_p, features.min_p)
        drawn_B = sample(scores, row_keys(knobs.seed, rows_B, step))
        return jnp.where(knobs.greedy, argmax_B, drawn_B) if features.mixed else drawn_B

    if not features.mixed:
        return sampled(None)
    samples_B = ~knobs.greedy if live_B is None else live_B & ~knobs.greedy
    return lax.cond(jnp.any(samples_B), sampled, lambda _: argmax_B, None)


def token_logprobs(logits_BxV: jax.Array, token_B: jax.Array, top: int = 0):
    """The model's raw log-probability of each row's token [B] (rows without one, id -1, read id 0), and with
    top > 0 the `top` likeliest ids [B, top] and theirs [B, top] (else None, None). Any leading axes work."""
    logp_BxV = jax.nn.log_softmax(logits_BxV)
    chosen_B = jnp.take_along_axis(logp_BxV, jnp.maximum(token_B, 0)[..., None], axis=-1)[..., 0]
    if not top:
        return chosen_B, None, None
    top_lp_BxT, top_ids_BxT = lax.top_k(logp_BxV, top)
    return chosen_B, top_ids_BxT.astype(jnp.int32), top_lp_BxT


# ------------------------------------------------------------------------------------------------ logits processors


def process(scores_BxV: jax.Array, knobs: Knobs, features: Features, step, seen_BxV=None) -> jax.Array:
    """HF's logits processors: the repetition penalty, then EOS suppression before min_new_tokens."""
    if features.penalty:
        scores_BxV = penalize(scores_BxV, seen_BxV, knobs.repetition_penalty)
    if knobs.min_new_tokens is not None:
        scores_BxV = suppress_eos(scores_BxV, knobs.eos_ids, step < knobs.min_new_tokens)
    return scores_BxV


def _per_row(x):
    """A per-row knob ([B] or []) shaped to broadcast against [B, V]."""
    return x[:, None] if jnp.ndim(x) == 1 else x


def suppress_eos(scores_BxV: jax.Array, eos_ids: jax.Array, active) -> jax.Array:
    """HF's MinNewTokensLengthLogitsProcessor: EOS ids get -inf while `active` (fewer than min_new_tokens)."""
    is_eos_V = jnp.isin(jnp.arange(scores_BxV.shape[-1]), eos_ids)
    return jnp.where(_per_row(active) & is_eos_V, NEG_INF, scores_BxV)


def penalize(scores_BxV: jax.Array, seen_BxV: jax.Array, penalty: jax.Array) -> jax.Array:
    """HF's RepetitionPenaltyLogitsProcessor: the scores of ids already in the row (prompt or generated) are divided
    by `penalty` where positive and multiplied by it where negative, so a penalty > 1 always makes them less likely."""
    penalty = _per_row(penalty)
    penalized_BxV = jnp.where(scores_BxV < 0, scores_BxV * penalty, scores_BxV / penalty)
    return jnp.where(seen_BxV, penalized_BxV, scores_BxV)


def seen_in_prompts(tokens_BxP: jax.Array, mask_BxP: jax.Array, vocab_size: int) -> jax.Array:
    """[B, vocab] bool: the ids in each left-padded prompt (padding excluded, as HF excludes it since v5)."""
    B = tokens_BxP.shape[0]
    ids_BxP = jnp.where(mask_BxP, tokens_BxP, vocab_size)  # out of range: dropped
    return jnp.zeros((B, vocab_size), bool).at[jnp.arange(B)[:, None], ids_BxP].set(True, mode="drop")


def mark_seen(seen_BxV: jax.Array, token_B: jax.Array) -> jax.Array:
    """The seen-ids mask with each row's new token added."""
    return seen_BxV.at[jnp.arange(seen_BxV.shape[0]), token_B].set(True)


# ------------------------------------------------------------------------------------------------ warpers and draws


def warp(logits_BxV: jax.Array, knobs: Knobs, use_top_k: bool, use_top_p: bool, use_min_p: bool = False) -> jax.Array:
    """Temperature, then top-k, then top-p, then min-p (HF's TemperatureLogitsWarper, TopKLogitsWarper,
    TopPLogitsWarper, MinPLogitsWarper with min_tokens_to_keep=1). Returns logits in vocab order with removed ids
    at -inf."""
    scores_BxV = _top_k_top_p(logits_BxV / _per_row(knobs.temperature), knobs, use_top_k, use_top_p)
    return min_p_filter(scores_BxV, knobs.min_p) if use_min_p else scores_BxV


def min_p_filter(scores_BxV: jax.Array, min_p: jax.Array) -> jax.Array:
    """HF's MinPLogitsWarper: removes ids whose probability is below min_p times the most likely id's (which, with
    min_p <= 1, always stays)."""
    probs_BxV = jax.nn.softmax(scores_BxV, axis=-1)
    remove_BxV = probs_BxV < _per_row(min_p) * jnp.max(probs_BxV, axis=-1, keepdims=True)
    return jnp.where(remove_BxV, NEG_INF, scores_BxV)


def _top_k_top_p(scores_BxV: jax.Array, knobs: Knobs, use_top_k: bool, use_top_p: bool) -> jax.Array:
    if not (use_top_k or use_top_p):
        return scores_BxV
    B, V = scores_BxV.shape
    # One ascending sort serves both filters: top-k only replaces the lowest V-k entries by -inf, which
    # leaves them first, so the order is also the one HF's top-p sort would find.
    order_BxV = jnp.argsort(scores_BxV, axis=-1, stable=True)
    sorted_BxV = jnp.take_along_axis(scores_BxV, order_BxV, axis=-1)
    if use_top_k:
        k_B = jnp.broadcast_to(jnp.clip(knobs.top_k, 1, V), (B,))
        kth_Bx1 = jnp.take_along_axis(sorted_BxV, (V - k_B)[:, None], axis=-1)
        # Ties with the k-th value are kept, as in HF (`scores < kth` is what gets removed).
        sorted_BxV = jnp.where(sorted_BxV < kth_Bx1, NEG_INF, sorted_BxV)
    if use_top_p:
        cum_probs_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
        remove_BxV = cum_probs_BxV <= _per_row(knobs.top_p_threshold)
        remove_BxV = remove_BxV.at[:, -1].set(False)  # min_tokens_to_keep = 1: the most likely id stays
        sorted_BxV = jnp.where(remove_BxV, NEG_INF, sorted_BxV)
    rows_Bx1 = jnp.arange(B)[:, None]
    return jnp.zeros_like(scores_BxV).at[rows_Bx1, order_BxV].set(sorted_BxV)


def row_keys(seed, row_ids_B: jax.Array, step) -> jax.Array:
    """One key per (seed, global row, step); seed and step are [] or [B]. Samples do not depend on batch size,
    padding or device count."""
    seed_B, step_B = (jnp.broadcast_to(x, row_ids_B.shape) for x in (seed, step))
    key = lambda s, r, t: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), r), t)
    return jax.vmap(key)(seed_B, row_ids_B, step_B)


def sample(scores_BxV: jax.Array, keys_B: jax.Array) -> jax.Array:
    """One id per row from softmax(scores); -inf ids are never drawn."""
    return jax.vmap(jax.random.categorical)(keys_B, scores_BxV).astype(jnp.int32)
