"""The offline decode program: prefill + a loop of decode steps, as per-device pure functions of one model config,
strategy and token bucket N.

    tokens_BxP, mask_BxP ─▶ prefill (one call: fills the KV cache, selects token 0)
                         ─▶ run: while step < stop and a row is not done { step.step ─▶ strategy's select }
                         ─▶ (ids [R, N], scores [R], log-probabilities [R, N])

The strategy (search.py: greedy and sampling, or beam search) owns the loop state; the step is the serving engine's
too (step.py). generate.Generator jits these functions (or runs them in plain Python: the debug path).
"""

from __future__ import annotations

from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
from jax import lax

from aigc_jax import model
from aigc_jax.configs import ModelConfig
from aigc_jax.decode.config import Strategy
from aigc_jax.decode.sampling import Knobs, seen_in_prompts
from aigc_jax.decode.search import BEAM, SAMPLE
from aigc_jax.decode.step import step


def python_while(cond, body, state):
    """lax.while_loop's semantics in plain Python: the debug path."""
    while bool(cond(state)):
        state = body(state)
    return state


class Program:
    """Per-device decode functions for one model config, strategy and token bucket N (shapes do the rest)."""

    def __init__(self, config: ModelConfig, strategy: Strategy, n_tokens: int, loop=lax.while_loop):
        self.config, self.strategy, self.n_tokens, self.loop = config, strategy, n_tokens, loop
        self.search = BEAM if strategy.kind == "beam" else SAMPLE

    def prefill(self, params, tokens_BxP, mask_BxP, row_ids_B, knobs: Knobs):
        """Runs the left-padded prompts through the model in one call and picks the first new token."""
        cfg = self.config
        B, P = tokens_BxP.shape
        positions_BxP = jnp.maximum(jnp.cumsum(mask_BxP, axis=1) - 1, 0).astype(jnp.int32)
        cache = model.KVCache.init(cfg, B, P + self.n_tokens)
        # The first P-1 tokens only fill the cache; their logits are dead code that XLA drops, so the
        # [B, P, vocab] logits of a long prompt are never materialised.
        _, cache = model.forward(
            params, tokens_BxP[:, :-1], cfg, positions_BxT=positions_BxP[:, :-1], cache=cache, mask_BxT=mask_BxP[:, :-1]
        )
        logits_Bx1xV, cache = model.forward(
            params, tokens_BxP[:, -1:], cfg, positions_BxT=positions_BxP[:, -1:], cache=cache, mask_BxT=mask_BxP[:, -1:]
        )
        logits_BxV = logits_Bx1xV[:, 0, : cfg.vocab_size]
        next_pos_B = positions_BxP[:, -1] + 1
        seen_BxV = (seen_in_prompts(tokens_BxP, mask_BxP, cfg.vocab_size) if self.strategy.features.penalty
                    else jnp.zeros((B, 0), bool))
        return self.search.init(cache, logits_BxV, next_pos_B, row_ids_B, seen_BxV, knobs, self.strategy,
                                self.n_tokens)

    def run(self, params, state, knobs: Knobs, stop):
        """Decodes until `stop` tokens were generated (traced: one executable for every chunk) or all rows are done."""
        cfg, search, strategy = self.config, self.search, self.strategy

        def cond(s):
            return (s.step < stop) & ~jnp.all(search.done(s, knobs))

        def body(s):
            logits_RxV, cache = step(params, search.last_tokens(s), s.next_pos_R, s.cache, cfg)
            s = s.replace(cache=cache, next_pos_R=s.next_pos_R + 1)
            return search.select(s, logits_RxV, knobs, strategy)

        return self.loop(cond, body, state)

    def generate(self, params, tokens_BxP, mask_BxP, row_ids_B, knobs: Knobs):
        """Prefill + the whole loop in one call: (ids [R, N], scores [R] (beam search; zeros otherwise), raw
        log-probabilities [R, N]); R = B, or B * num_return for beam search (a prompt's hypotheses consecutive)."""
        state = self.prefill(params, tokens_BxP, mask_BxP, row_ids_B, knobs)
        return self.search.result(self.run(params, state, knobs, knobs.max_new_tokens), self.strategy)

    def calls(self, packed: bool) -> dict[str, Callable]:
        """generate, prefill and run. Per-device programs (`packed`) hand the state across the device boundary,
        where every leaf must split like the batch: per-device scalars (step, cache index) travel as a [1] per
        device. Global-view programs on a mesh hand it on whole."""
        if not packed:
            return {"generate": self.generate, "prefill": self.prefill, "run": self.run}

        def prefill_packed(*args):
            return _pack(self.prefill(*args))

        def run_packed(params, state, knobs, stop):
            return _pack(self.run(params, _unpack(state), knobs, stop))

        return {"generate": self.generate, "prefill": prefill_packed, "run": run_packed}


@flax.struct.dataclass
class _PerDevice:
    value: jax.Array  # [1]: one device's scalar


def _pack(state):
    return jax.tree.map(lambda x: _PerDevice(x[None]) if x.ndim == 0 else x, state)


def _unpack(state):
    is_packed = lambda x: isinstance(x, _PerDevice)
    return jax.tree.map(lambda x: x.value[0] if is_packed(x) else x, state, is_leaf=is_packed)
