"""Beam search, step for step HF transformers' (v5) `_beam_search`, as a pure state -> state function.

Per prompt b, with nb = num_beams and K = max(2, 1 + n_eos) * nb:
1. every running beam's log-softmax (sampling.process: repetition-penalised over its prompt and tokens, EOS at
   -inf before min_new_tokens) is added to its running score; the top K
   of the nb·V continuations are kept (K > nb so that nb of them are still running even if many hit EOS);
2. a continuation "hits" if its token is an EOS or it is the last allowed token;
3. the best nb continuations that did not hit become the running beams (the cache rows follow them);
4. hits among the top nb continuations join the finished hypotheses with score
   sum_logprob / generated_length ** length_penalty (generated_length includes the EOS); the best nb are kept;
5. a prompt is done when `early_stopping=True` and nb hypotheses are finished, or when HF's heuristic says the best
   running beam can no longer beat the worst finished one (at the current length, or with "never" and a positive
   length_penalty at the maximal length).
The answer is the best finished hypothesis (the best num_return_sequences, in order); its tokens after the EOS are
the pad id. Each hypothesis also carries its tokens' raw log-probabilities (the model's log-softmax, unpenalised).
-1e9 penalties are added exactly as HF adds them, so ties and near-ties resolve the same way.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
from jax import lax

from aigc_jax.decode.config import Strategy
from aigc_jax.decode.sampling import Knobs, mark_seen, process
from aigc_jax.models.cache import KVCache

PENALTY = -1.0e9


@flax.struct.dataclass
class BeamState:
    cache: KVCache  # batch B*nb, beam-major within a prompt (row b*nb + j is beam j of prompt b)
    next_pos_R: jax.Array  # [B*nb] position at which the latest token is fed
    running_BxNbxN: jax.Array  # [B, nb, N] generated ids of the running beams (pad beyond `step`)
    running_scores_BxNb: jax.Array  # [B, nb] summed log-probs, best first
    finished_BxNbxN: jax.Array  # [B, nb, N] the best finished hypotheses
    finished_scores_BxNb: jax.Array  # [B, nb] their length-penalised scores, best first (-1e9 = empty slot)
    is_finished_BxNb: jax.Array  # [B, nb] bool: slot holds a real hypothesis
    improvable_B: jax.Array  # [B] bool: HF's is_early_stop_heuristic_unsatisfied
    seen_RxV: jax.Array  # [B*nb, V] bool: ids in each beam's prompt and tokens ([B*nb, 0] without a penalty)
    running_lp_BxNbxN: jax.Array  # [B, nb, N] f32: raw log-probability of each running beam's tokens
    finished_lp_BxNbxN: jax.Array  # [B, nb, N] f32: ... of each finished hypothesis's tokens
    step: jax.Array  # [] tokens generated so far


def init(cache: KVCache, logits_BxV, next_pos_B, row_ids_B, seen_BxV, knobs: Knobs, strategy: Strategy,
         n_tokens: int):
    """State after the prefill of B prompts; selects the first token. Filler rows (row_id < 0) start done."""
    nb = strategy.num_beams
    B = logits_BxV.shape[0]
    # Each prompt's row, nb times over (rows stay in their prompt's group: local when the batch is split).
    repeat = lambda x: jnp.repeat(x, nb, axis=0, total_repeat_length=B * nb)
    # Beams 1.. start at -1e9 so that the first step expands only beam 0 (all beams are the same prompt).
    scores_BxNb = jnp.where(jnp.arange(nb) == 0, 0.0, PENALTY) * jnp.ones((B, 1), jnp.float32)
    tokens = jnp.full((B, nb, n_tokens), knobs.pad_id, jnp.int32)
    state = BeamState(
        cache=cache.gather_groups(jnp.zeros((B, nb), jnp.int32)),
        next_pos_R=repeat(next_pos_B),
        running_BxNbxN=tokens,
        running_scores_BxNb=scores_BxNb,
        finished_BxNbxN=tokens,
        finished_scores_BxNb=jnp.full((B, nb), PENALTY, jnp.float32),
        is_finished_BxNb=jnp.zeros((B, nb), bool),
        improvable_B=row_ids_B >= 0,
        seen_RxV=repeat(seen_BxV),
        running_lp_BxNbxN=jnp.zeros((B, nb, n_tokens), jnp.float32),
        finished_lp_BxNbxN=jnp.zeros((B, nb, n_tokens), jnp.float32),
        step=jnp.zeros((), jnp.int32),
    )
    return select(state, repeat(logits_BxV), knobs, strategy)


def last_tokens(state: BeamState) -> jax.Array:
    """[B*nb] the ids to feed next: each running beam's latest token."""
    B, nb, _ = state.running_BxNbxN.shape
    col = lax.dynamic_slice_in_dim(state.running_BxNbxN, state.step - 1, 1, axis=2)
    return col.reshape(B * nb)


def done(state: BeamState, knobs: Knobs) -> jax.Array:
    full_B = jnp.all(state.is_finished_BxNb, axis=-1) & knobs.early_stopping_true
    return ~state.improvable_B | full_B


def result(state: BeamState, strategy: Strategy):
    """(tokens [B*n, N], scores [B*n], log-probabilities [B*n, N]) of each prompt's n = num_return best hypotheses,
    best first (row b*n + j is prompt b's j-th, HF's order)."""
    n = strategy.num_return
    rows = lambda x: x[:, :n].reshape(-1, *x.shape[2:])
    return rows(state.finished_BxNbxN), rows(state.finished_scores_BxNb), rows(state.finished_lp_BxNbxN)


def _gather(x_BxK, idx_BxJ):
    """x[b, idx[b, j]] along axis 1, trailing axes carried along."""
    idx = idx_BxJ.reshape(idx_BxJ.shape + (1,) * (x_BxK.ndim - 2))
    return jnp.take_along_axis(x_BxK, idx, axis=1)


def select(state: BeamState, logits_RxV, knobs: Knobs, strategy: Strategy) -> BeamState:
    B, nb, N = state.running_BxNbxN.shape
    V = logits_RxV.shape[-1]
    K = max(2, 1 + strategy.n_eos) * nb
    t = state.step

    raw_RxV = jax.nn.log_softmax(logits_RxV, axis=-1)
    log_probs_RxV = process(raw_RxV, knobs, strategy.features, t, state.seen_RxV)
    acc_BxNbxV = log_probs_RxV.reshape(B, nb, V) + state.running_scores_BxNb[:, :, None]
    top_scores_BxK, top_idx_BxK = lax.top_k(acc_BxNbxV.reshape(B, nb * V), K)
    src_BxK, tok_BxK = top_idx_BxK // V, (top_idx_BxK % V).astype(jnp.int32)
    extend = lambda x_BxNbxN, new_BxK: lax.dynamic_update_slice_in_dim(_gather(x_BxNbxN, src_BxK),
                                                                        new_BxK[:, :, None], t, axis=2)
    top_tokens_BxKxN = extend(state.running_BxNbxN, tok_BxK)
    top_lp_BxKxN = extend(state.running_lp_BxNbxN, jnp.take_along_axis(raw_RxV.reshape(B, nb * V), top_idx_BxK, 1))
    hits_BxK = jnp.isin(tok_BxK, knobs.eos_ids) | (t + 1 >= knobs.max_new_tokens)

    # 3. The running beams of the next step: the best nb continuations that did not hit.
    running_scores_BxK = top_scores_BxK + hits_BxK.astype(jnp.float32) * PENALTY
    running_scores_BxNb, keep_BxNb = lax.top_k(running_scores_BxK, nb)
    running_BxNbxN = _gather(top_tokens_BxKxN, keep_BxNb)
    parent_BxNb = _gather(src_BxK, keep_BxNb)
    seen_RxV = state.seen_RxV
    if strategy.features.penalty:  # each new beam inherits its parent's ids, plus its new token
        seen_RxV = _gather(seen_RxV.reshape(B, nb, V), parent_BxNb).reshape(B * nb, V)
        seen_RxV = mark_seen(seen_RxV, running_BxNbxN[:, :, t].reshape(B * nb))

    # 4. Finished hypotheses, merged with the best so far.
    just_finished_BxK = hits_BxK & (jnp.arange(K) < nb)
    cand_BxK = top_scores_BxK / knobs.length_norm[t + 1]
    full_B = jnp.all(state.is_finished_BxNb, axis=-1) & knobs.early_stopping_true
    cand_BxK = cand_BxK + full_B[:, None].astype(jnp.float32) * PENALTY
    cand_BxK = cand_BxK + (~state.improvable_B)[:, None].astype(jnp.float32) * PENALTY
    cand_BxK = cand_BxK + (~just_finished_BxK).astype(jnp.float32) * PENALTY
    merged_scores = jnp.concatenate([state.finished_scores_BxNb, cand_BxK], axis=1)
    finished_scores_BxNb, best_BxNb = lax.top_k(merged_scores, nb)
    merged = lambda old_BxNbxN, new_BxKxN: _gather(jnp.concatenate([old_BxNbxN, new_BxKxN], axis=1), best_BxNb)
    finished_BxNbxN = merged(state.finished_BxNbxN, top_tokens_BxKxN)
    finished_lp_BxNbxN = merged(state.finished_lp_BxNbxN, top_lp_BxKxN)
    is_finished_BxNb = merged(state.is_finished_BxNb, just_finished_BxK)

    improvable_B = state.improvable_B & _improvable(running_scores_BxNb, finished_scores_BxNb, is_finished_BxNb,
                                                    knobs, t + 1)
    return state.replace(
        cache=state.cache.gather_groups(parent_BxNb),
        running_BxNbxN=running_BxNbxN,
        running_scores_BxNb=running_scores_BxNb,
        running_lp_BxNbxN=_gather(top_lp_BxKxN, keep_BxNb),
        seen_RxV=seen_RxV,
        finished_BxNbxN=finished_BxNbxN,
        finished_lp_BxNbxN=finished_lp_BxNbxN,
        finished_scores_BxNb=finished_scores_BxNb,
        is_finished_BxNb=is_finished_BxNb,
        improvable_B=improvable_B,
        step=t + 1,
    )


def _improvable(running_scores_BxNb, finished_scores_BxNb, is_finished_BxNb, knobs: Knobs, length) -> jax.Array:
    """5. HF's early-stop heuristic, evaluated with the new length: [B] whether the best running beam can still
    beat the worst finished hypothesis."""
    use_max_len = knobs.early_stopping_never & (knobs.length_penalty > 0)
    best_len = jnp.where(use_max_len, knobs.max_new_tokens, length)
    best_running_B = running_scores_BxNb[:, 0] / knobs.length_norm[best_len]
    worst_finished_BxNb = jnp.where(
        is_finished_BxNb, jnp.min(finished_scores_BxNb, axis=1, keepdims=True), PENALTY
    )
    return jnp.any(best_running_B[:, None] > worst_finished_BxNb, axis=1)
