"""The decoding strategies the offline loop (generate.Program) runs: greedy and sampling (`SAMPLE`, one row per
output sequence) and beam search (`BEAM`, beam.py). Each is a state dataclass and five pure functions; the loop
feeds every row's latest token through decode/step.py and hands the logits to the strategy's `select`.
"""

from __future__ import annotations

from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
from jax import lax

from aigc_jax import model
from aigc_jax.decode import beam, sampling
from aigc_jax.decode.config import Strategy
from aigc_jax.decode.sampling import Knobs


class Search:
    """The five functions a decoding strategy provides to the shared loop, and the class of its state.

    init(cache, logits_BxV, next_pos_B, row_ids_B, seen_BxV, knobs, strategy, n_tokens): the state after the
    prefill, with the first token selected; select(state, logits_RxV, knobs, strategy): the next token of every
    row; last_tokens(state): [R] the ids to feed; done(state, knobs): [B] bool; result(state, strategy): (ids
    [R, N], scores [R], log-probabilities [R, N])."""

    def __init__(self, state: type, init: Callable, select: Callable, last_tokens: Callable, done: Callable,
                 result: Callable):
        self.state = state
        self.init, self.select, self.last_tokens, self.done, self.result = init, select, last_tokens, done, result


@flax.struct.dataclass
class SampleState:
    cache: model.KVCache
    next_pos_R: jax.Array  # [B] position at which the latest token is fed (R = rows, as in beam.BeamState)
    tokens_BxN: jax.Array  # generated ids; pad after a row finished and beyond `step`
    finished_B: jax.Array  # bool: emitted an EOS (filler rows start finished)
    row_ids_B: jax.Array  # global row index (seeds the row's samples); -1 for filler rows
    seen_BxV: jax.Array  # bool: ids in the prompt or generated (the repetition penalty's); [B, 0] without it
    logprobs_BxN: jax.Array  # f32: each generated id's raw log-probability (zeros unless features.logprobs)
    step: jax.Array  # [] tokens generated so far


def _sample_init(cache, logits_BxV, next_pos_B, row_ids_B, seen_BxV, knobs: Knobs, strategy: Strategy,
                 n_tokens: int) -> SampleState:
    B = logits_BxV.shape[0]
    state = SampleState(
        cache=cache,
        next_pos_R=next_pos_B,
        tokens_BxN=jnp.full((B, n_tokens), knobs.pad_id, jnp.int32),
        finished_B=row_ids_B < 0,
        row_ids_B=row_ids_B,
        seen_BxV=seen_BxV,
        logprobs_BxN=jnp.zeros((B, n_tokens), jnp.float32),
        step=jnp.zeros((), jnp.int32),
    )
    return _sample_select(state, logits_BxV, knobs, strategy)


def _sample_select(state: SampleState, logits_BxV, knobs: Knobs, strategy: Strategy) -> SampleState:
    t, features = state.step, strategy.features
    token_B = sampling.select(logits_BxV, knobs, features, t, state.seen_BxV, rows_B=state.row_ids_B)
    token_B = jnp.where(state.finished_B, knobs.pad_id, token_B)
    put = lambda buf_BxN, x_B: lax.dynamic_update_slice_in_dim(buf_BxN, x_B[:, None], t, axis=1)
    if features.penalty:
        state = state.replace(seen_BxV=sampling.mark_seen(state.seen_BxV, token_B))
    if features.logprobs:
        logprob_B, _, _ = sampling.token_logprobs(logits_BxV, token_B)
        state = state.replace(logprobs_BxN=put(state.logprobs_BxN, jnp.where(state.finished_B, 0.0, logprob_B)))
    finished_B = state.finished_B | jnp.isin(token_B, knobs.eos_ids)
    return state.replace(tokens_BxN=put(state.tokens_BxN, token_B), finished_B=finished_B, step=t + 1)


def _sample_last_tokens(state: SampleState) -> jax.Array:
    return lax.dynamic_slice_in_dim(state.tokens_BxN, state.step - 1, 1, axis=1)[:, 0]


def _sample_result(state: SampleState, strategy: Strategy):
    return state.tokens_BxN, jnp.zeros(state.tokens_BxN.shape[0], jnp.float32), state.logprobs_BxN


SAMPLE = Search(SampleState, _sample_init, _sample_select, _sample_last_tokens,
                done=lambda state, knobs: state.finished_B, result=_sample_result)
BEAM = Search(beam.BeamState, beam.init, beam.select, beam.last_tokens, beam.done, beam.result)
