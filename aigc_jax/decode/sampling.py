"""Next-token selection with HF transformers' semantics, as pure functions on fp32 logits [B, V].

HF applies, in this order: the repetition penalty (over the prompt and the tokens generated so far), EOS
suppression while fewer than `min_new_tokens` were generated, then (sampling only) temperature → top-k → top-p →
min-p, then samples from the softmax (or takes the argmax when greedy). Beam search applies the penalty and the
EOS suppression to log-softmax scores, as HF's beam search does. Removed ids get -inf, HF's `filter_value`, so the
filtered logits can be compared with HF's processors.

The knobs arrive as traced values (`Knobs`), so changing temperature/top-k/top-p/min-p/the penalty, EOS ids or
beam settings does not recompile; only whether top-k / top-p / min-p / the penalty are on at all is static (a sort,
or a [rows, vocab] mask of the tokens seen, is paid for only when needed).
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -jnp.inf


@flax.struct.dataclass
class Knobs:
    """The per-call numbers of a decode, replicated on every device. Built on the host by `make_knobs`."""

    temperature: jax.Array  # [] f32, > 0 (greedy does not read it)
    top_k: jax.Array  # [] i32; ignored unless the strategy has use_top_k
    top_p_threshold: jax.Array  # [] f32 = 1 - top_p (computed in float64 on the host, as HF's Python float)
    min_p: jax.Array  # [] f32; ignored unless the strategy has use_min_p
    repetition_penalty: jax.Array  # [] f32; ignored unless the strategy has use_penalty
    seed: jax.Array  # [] u32
    eos_ids: jax.Array  # [Strategy.n_eos] i32 (static length); -1 pads "no EOS"
    pad_id: jax.Array  # [] i32, emitted by finished rows
    max_new_tokens: jax.Array  # [] i32, <= the token-buffer bucket
    min_new_tokens: jax.Array  # [] i32
    length_penalty: jax.Array  # [] f32
    length_norm: jax.Array  # [N+1] f32: length_norm[n] = n ** length_penalty, as HF computes it (float64 -> f32)
    early_stopping_true: jax.Array  # [] bool: beam search's early_stopping is True
    early_stopping_never: jax.Array  # [] bool: ... is "never"


def make_knobs(gen, n_bucket: int) -> Knobs:
    """Host-side numbers for a `GenerationConfig`; `n_bucket` is the static token-buffer length. (A config without
    a seed gets a fresh one here; callers that report the seed resolve it first with `gen.with_seed()`.)"""
    gen = gen.with_seed()
    lengths = np.arange(n_bucket + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):  # 0 ** negative is never read: lengths start at 1
        norm = lengths ** float(gen.length_penalty)
    return Knobs(
        temperature=np.float32(gen.temperature if gen.temperature > 0 else 1.0),
        top_k=np.int32(gen.top_k),
        top_p_threshold=np.float32(1.0 - float(gen.top_p)),
        min_p=np.float32(gen.min_p),
        repetition_penalty=np.float32(gen.repetition_penalty),
        seed=np.uint32(gen.seed % 2**32),
        # No EOS is an id that never occurs (-1), so "no EOS" shares the executable of one EOS id.
        eos_ids=np.asarray(tuple(gen.eos_ids) or (-1,), np.int32),
        pad_id=np.int32(gen.pad),
        max_new_tokens=np.int32(gen.max_new_tokens),
        min_new_tokens=np.int32(gen.min_new_tokens),
        length_penalty=np.float32(gen.length_penalty),
        length_norm=norm.astype(np.float32),
        early_stopping_true=np.bool_(gen.early_stopping is True),
        early_stopping_never=np.bool_(gen.early_stopping == "never"),
    )


def suppress_eos(scores_BxV: jax.Array, eos_ids: jax.Array, active: jax.Array) -> jax.Array:
    """HF's MinNewTokensLengthLogitsProcessor: EOS ids get -inf while `active` (fewer than min_new_tokens)."""
    is_eos_V = jnp.isin(jnp.arange(scores_BxV.shape[-1]), eos_ids)
    return jnp.where(active & is_eos_V, NEG_INF, scores_BxV)


def penalize(scores_BxV: jax.Array, seen_BxV: jax.Array, penalty: jax.Array) -> jax.Array:
    """HF's RepetitionPenaltyLogitsProcessor: the scores of ids already in the row (prompt or generated) are divided
    by `penalty` where positive and multiplied by it where negative, so a penalty > 1 always makes them less likely."""
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


def warp(logits_BxV: jax.Array, knobs: Knobs, use_top_k: bool, use_top_p: bool, use_min_p: bool = False) -> jax.Array:
    """Temperature, then top-k, then top-p, then min-p (HF's TemperatureLogitsWarper, TopKLogitsWarper,
    TopPLogitsWarper, MinPLogitsWarper with min_tokens_to_keep=1). Returns logits in vocab order with removed ids
    at -inf."""
    scores_BxV = _top_k_top_p(logits_BxV / knobs.temperature, knobs, use_top_k, use_top_p)
    return min_p_filter(scores_BxV, knobs.min_p) if use_min_p else scores_BxV


def min_p_filter(scores_BxV: jax.Array, min_p: jax.Array) -> jax.Array:
    """HF's MinPLogitsWarper: removes ids whose probability is below min_p times the most likely id's (which, with
    min_p <= 1, always stays)."""
    probs_BxV = jax.nn.softmax(scores_BxV, axis=-1)
    remove_BxV = probs_BxV < min_p * jnp.max(probs_BxV, axis=-1, keepdims=True)
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
        k = jnp.clip(knobs.top_k, 1, V)
        kth_Bx1 = lax_index(sorted_BxV, V - k)
        # Ties with the k-th value are kept, as in HF (`scores < kth` is what gets removed).
        sorted_BxV = jnp.where(sorted_BxV < kth_Bx1, NEG_INF, sorted_BxV)
    if use_top_p:
        cum_probs_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
        remove_BxV = cum_probs_BxV <= knobs.top_p_threshold
        remove_BxV = remove_BxV.at[:, -1].set(False)  # min_tokens_to_keep = 1: the most likely id stays
        sorted_BxV = jnp.where(remove_BxV, NEG_INF, sorted_BxV)
    rows_Bx1 = jnp.arange(B)[:, None]
    return jnp.zeros_like(scores_BxV).at[rows_Bx1, order_BxV].set(sorted_BxV)


def lax_index(x_BxV: jax.Array, col: jax.Array) -> jax.Array:
    """x[:, col] for a traced scalar col, kept 2-D ([B, 1])."""
    return jax.lax.dynamic_slice_in_dim(x_BxV, col, 1, axis=1)


def row_keys(seed: jax.Array, row_ids_B: jax.Array, step: jax.Array) -> jax.Array:
    """One key per (global row, step): samples do not depend on batch size, padding or device count."""
    base = jax.random.key(seed)
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(base, r), step))(row_ids_B)


def sample(scores_BxV: jax.Array, keys_B: jax.Array) -> jax.Array:
    """One id per row from softmax(scores); -inf ids are never drawn."""
    return jax.vmap(jax.random.categorical)(keys_B, scores_BxV).astype(jnp.int32)
