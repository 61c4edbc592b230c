"""The serving engine's device programs: prefill prompts into slots, decode a chunk of steps for every slot, score.

    slots (B rows of one KV cache, per-row write index) ──▶ decode chunk: ≤ K steps for all B rows at once
         ▲                                                   (each row at its own length, its own sampling knobs)
         └── prefill: a few new prompts run alone (cache of P slots), then written into free rows

A row of the cache holds one sequence with position p at slot p, so a row's write index is also the position of the
token it feeds next. A new prompt of n tokens prefills its first n-1 tokens (no logits: XLA drops them) and leaves
its last token to feed: the first new token then comes out of an ordinary decode step, computed exactly as
offline `generate` computes it (one token against the cached prompt).

Rows never interact, so a request's tokens do not depend on what else runs. Rows that are empty or finished keep
computing (shapes are fixed) on token 0 at position 0 without advancing: their writes stay finite and inside the
row, which the next prefill overwrites. (Letting them run on would feed positions past the context, where the
position-embedding lookup returns NaN, and a NaN value in a masked slot still poisons probs·v.)

Every program takes the params and the slot state as arguments, and `Programs` is the one place they are jitted:
on a (data, fsdp, tensor) mesh (`aigc-jax serve --mesh`) the params are placed tensor-parallel and the slot cache
split over rows and heads as the offline Generator's (decode/mesh.py), and the programs jitted with those shardings.
"""

from __future__ import annotations

import dataclasses

import threading

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from aigc_jax import model, sharding
from aigc_jax.decode import mesh as decode_mesh
from aigc_jax.decode.config import bucket
from aigc_jax.decode.sampling import row_keys, sample, warp
from aigc_jax.errors import UserError

TOP_LOGPROBS = 5  # alternatives per token (OpenAI's limit for the completions API)


@flax.struct.dataclass
class Slots:
    cache: model.KVCache  # [B rows], per-row index
    last_B: jax.Array  # int32: the token each row feeds next


@flax.struct.dataclass
class RowKnobs:
    """Per-row numbers of one decode chunk, built on the host: mixing requests changes values, never shapes."""

    active_B: jax.Array  # bool: the row holds a sequence still generating
    budget_B: jax.Array  # int32: tokens it may still generate
    step_B: jax.Array  # int32: tokens it generated so far (the sampling key's step)
    greedy_B: jax.Array  # bool
    temperature_B: jax.Array  # f32 > 0
    top_k_B: jax.Array  # int32; the vocabulary size = off
    top_p_threshold_B: jax.Array  # f32 = 1 - top_p (0 = off)
    seed_B: jax.Array  # uint32
    row_B: jax.Array  # int32: the choice index (the sampling key's row, as offline generate's batch row)
    eos_ids: jax.Array  # [E] int32, shared by every row
    use_eos_B: jax.Array  # bool: the row ends at an EOS id (False: ignore_eos)
    n_steps: jax.Array  # [] int32 <= K: steps to run
    stop_early: jax.Array  # [] bool: return after the first step in which some row finished (a request waits)
    logprobs: jax.Array  # [] bool: some row asks for log-probabilities


@flax.struct.dataclass
class Chunk:
    tokens_BxK: jax.Array  # int32, -1 where the row produced nothing
    n_B: jax.Array  # int32: tokens produced per row
    eos_B: jax.Array  # bool: the row ended on an EOS id
    logprob_BxK: jax.Array  # f32: log-probability of each token under the model (before temperature etc.)
    top_ids_BxKxT: jax.Array  # int32 [B, K, TOP_LOGPROBS] (zeros unless knobs.logprobs)
    top_logprob_BxKxT: jax.Array


def _warp_row(logits_V, temperature, top_k, top_p_threshold):
    knobs = _Warp(temperature, top_k, top_p_threshold)
    return warp(logits_V[None], knobs, use_top_k=True, use_top_p=True)[0]


@flax.struct.dataclass
class _Warp:  # the three fields sampling.warp reads, one row's worth
    temperature: jax.Array
    top_k: jax.Array
    top_p_threshold: jax.Array


def pick(logits_BxV, knobs: RowKnobs, step_B, live_B):
    """Each row's next token: argmax, or temperature → top-k → top-p and a draw with the key (seed, row, step), the
    key offline generate uses for batch row `row`. The sampling branch runs only when a live row samples (lax.cond),
    so an all-greedy batch pays for the argmax alone and one program serves both."""
    greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

    def sampled(_):
        scores_BxV = jax.vmap(_warp_row)(logits_BxV, knobs.temperature_B, knobs.top_k_B, knobs.top_p_threshold_B)
        keys_B = jax.vmap(lambda s, r, t: row_keys(s, r[None], t)[0])(knobs.seed_B, knobs.row_B, step_B)
        return jnp.where(knobs.greedy_B, greedy_B, sample(scores_BxV, keys_B))

    return lax.cond(jnp.any(live_B & ~knobs.greedy_B), sampled, lambda _: greedy_B, None)


def decode_chunk(params, slots: Slots, knobs: RowKnobs, *, config, k: int, span: int, rows: int):
    """Up to `knobs.n_steps` (<= k) decode steps for the first `rows` rows (every busy row is among them),
    attending to their first `span` slots (every live row's positions stay below it during the chunk); returns
    (slots, Chunk of `rows` rows).

    Attention over all `max_len` slots of every row was most of a step's time (baby model, 32 rows on CPU: 21 ms
    at 32 slots, 33 at 128, 53-85 at 256), and a lone request paid for all 32 rows. So the chunk runs on a copy of
    that corner of the cache, written back once at its end. Rows that are not live write nowhere (their index is
    outside the span: writes there are dropped) or into slots the next prefill replaces."""
    full, B = slots, slots.last_B.shape[0]
    corner = span < full.cache.max_len or rows < B
    if corner:
        c = full.cache
        slots = Slots(cache=c.replace(k=c.k[:, :rows, :, :, :span], v=c.v[:, :rows, :, :span], pos=c.pos[:rows, :span],
                                      index=c.index[:rows]), last_B=full.last_B[:rows])
        knobs = knobs.replace(**{f.name: getattr(knobs, f.name)[:rows] for f in dataclasses.fields(knobs)
                                 if f.name.endswith("_B")})
    slots, out = _decode_steps(params, slots, knobs, config=config, k=k)
    if corner:
        # dynamic_update_slice, not .at[:rows, :span].set: XLA's CPU scatter loops element by element.
        put = lambda big, part: lax.dynamic_update_slice(big, part, (0,) * big.ndim)
        c, f = slots.cache, full.cache
        slots = Slots(cache=f.replace(k=put(f.k, c.k), v=put(f.v, c.v), pos=put(f.pos, c.pos),
                                      index=put(f.index, c.index)), last_B=put(full.last_B, slots.last_B))
    return slots, out


def _decode_steps(params, slots: Slots, knobs: RowKnobs, *, config, k: int):
    B, V, T = slots.last_B.shape[0], config.vocab_size, TOP_LOGPROBS
    out = Chunk(
        tokens_BxK=jnp.full((B, k), -1, jnp.int32), n_B=jnp.zeros(B, jnp.int32), eos_B=jnp.zeros(B, bool),
        logprob_BxK=jnp.zeros((B, k), jnp.float32), top_ids_BxKxT=jnp.zeros((B, k, T), jnp.int32),
        top_logprob_BxKxT=jnp.zeros((B, k, T), jnp.float32),
    )

    def finished(o):
        return ~knobs.active_B | o.eos_B | (o.n_B >= knobs.budget_B)

    def cond(carry):
        t, _, o = carry
        someone_done = jnp.any(knobs.active_B & finished(o))
        return (t < knobs.n_steps) & ~jnp.all(finished(o)) & ~(knobs.stop_early & someone_done)

    def body(carry):
        t, s, o = carry
        live_B = ~finished(o)
        index_B = s.cache.index
        tokens_Bx1 = jnp.where(live_B, s.last_B, 0)[:, None]
        positions_Bx1 = jnp.where(live_B, index_B, 0)[:, None]
        logits_Bx1xV, cache = model.forward(params, tokens_Bx1, config, positions_BxT=positions_Bx1, cache=s.cache)
        cache = cache.replace(index=jnp.where(live_B, cache.index, index_B))
        logits_BxV = logits_Bx1xV[:, 0, :V]
        token_B = jnp.where(live_B, pick(logits_BxV, knobs, knobs.step_B + o.n_B, live_B), -1)
        o = o.replace(
            tokens_BxK=o.tokens_BxK.at[:, t].set(token_B),
            n_B=o.n_B + live_B,
            eos_B=o.eos_B | (live_B & knobs.use_eos_B & jnp.isin(token_B, knobs.eos_ids)),
        )
        o = lax.cond(knobs.logprobs, _with_logprobs, lambda o, *_: o, o, logits_BxV, token_B, t)
        return t + 1, s.replace(cache=cache, last_B=jnp.where(live_B, token_B, s.last_B)), o

    _, slots, out = lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), slots, out))
    return slots, out


def _with_logprobs(o: Chunk, logits_BxV, token_B, t) -> Chunk:
    """Step t's log-probability of each chosen token and the TOP_LOGPROBS likeliest, under the model's logits."""
    logp_BxV = jax.nn.log_softmax(logits_BxV)
    top_lp_BxT, top_ids_BxT = lax.top_k(logp_BxV, TOP_LOGPROBS)
    chosen_B = jnp.take_along_axis(logp_BxV, jnp.maximum(token_B, 0)[:, None], axis=-1)[:, 0]
    return o.replace(logprob_BxK=o.logprob_BxK.at[:, t].set(chosen_B),
                     top_ids_BxKxT=o.top_ids_BxKxT.at[:, t].set(top_ids_BxT.astype(jnp.int32)),
                     top_logprob_BxKxT=o.top_logprob_BxKxT.at[:, t].set(top_lp_BxT))


def prefill(params, slots: Slots, tokens_bxP, lengths_b, last_b, rows_b, *, config):
    """Runs `lengths_b` tokens of each (right-padded) prompt prefix alone and writes them into cache rows `rows_b`
    (rows >= B are filler and dropped); each row then feeds `last_b` at position lengths_b."""
    b, P = tokens_bxP.shape
    positions_bxP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (b, P))
    mask_bxP = positions_bxP < lengths_b[:, None]
    fresh = model.KVCache.init(config, b, P, per_row=True)
    _, fresh = model.forward(params, tokens_bxP, config, positions_BxT=positions_bxP, cache=fresh, mask_BxT=mask_bxP)
    c = slots.cache
    empty_bxR = jnp.full((b, c.max_len - P), -1, jnp.int32)
    cache = c.replace(
        k=c.k.at[:, rows_b, :, :, :P].set(fresh.k, mode="drop"),
        v=c.v.at[:, rows_b, :, :P, :].set(fresh.v, mode="drop"),
        pos=c.pos.at[rows_b].set(jnp.concatenate([fresh.pos, empty_bxR], axis=1), mode="drop"),
        index=c.index.at[rows_b].set(lengths_b, mode="drop"),
    )
    return Slots(cache=cache, last_B=slots.last_B.at[rows_b].set(last_b, mode="drop"))


def score(params, tokens_bxP, *, config):
    """Log-probabilities of every token given its prefix (position j scores token j+1), and the TOP_LOGPROBS most
    likely tokens at each position: what `echo` with `logprobs` returns. Returns ([b, P-1], [b, P, T] ×2)."""
    logits_bxPxV, _ = model.forward(params, tokens_bxP, config)
    logp_bxPxV = jax.nn.log_softmax(logits_bxPxV[..., : config.vocab_size])
    next_bxP1 = jnp.take_along_axis(logp_bxPxV[:, :-1], tokens_bxP[:, 1:, None], axis=-1)[..., 0]
    top_lp, top_ids = lax.top_k(logp_bxPxV, TOP_LOGPROBS)
    return next_bxP1, top_ids.astype(jnp.int32), top_lp


# Jitted programs shared by every engine: params and slots are arguments, so another engine for the same config
# (or the same model loaded again) reuses the executables. Each entry counts its traces (= compilations).
_JITTED: dict[tuple, tuple] = {}
_COUNT_LOCK = threading.Lock()


def _jitted(fn, donate: tuple, mesh=None, shardings=None, **static):
    """(the jitted `fn`, its trace count); on a mesh, `shardings` = (in_shardings, out_shardings)."""
    key = (fn.__name__, decode_mesh.key(mesh), tuple(sorted(static.items())))
    if key not in _JITTED:
        count = [0]

        def traced(*args):
            with _COUNT_LOCK:  # warm-up traces programs in parallel threads
                count[0] += 1
            return fn(*args, **static)

        if mesh is None:
            _JITTED[key] = (jax.jit(traced, donate_argnums=donate), count)
        else:
            _JITTED[key] = (decode_mesh.jit(traced, mesh, *shardings, donate_argnums=donate), count)
    return _JITTED[key]


class Programs:
    """The jitted programs for one model and slot count, and the shape buckets they are compiled for.

    Buckets: prompt prefixes to powers of two (>= 16, <= the context), prefill batches of 1 or `max_prefill`; the decode chunk has one program per (attention span, row count): greedy and sampled rows, with
    or without log-probabilities, share it (lax.cond skips the work no row asks for), which cut a cold start's
    programs (with prefill batches of 1 or `max_prefill` only) from 44 to 21 for the 256-token baby model. `compiles` counts the compilations of these programs (by
    this engine or another one for the same config).

    `mesh` (decode/mesh.resolve's Mesh, or None for one device): params tensor-parallel, the slot cache and the
    decode chunk's rows over data x fsdp, prefill and score inputs (a few prompts) and the knobs replicated.
    """

    def __init__(self, config, params, n_slots: int, chunk: int, max_prefill: int, mesh=None):
        self.config, self.mesh = config, mesh
        self.n_slots, self.chunk, self.max_prefill = n_slots, chunk, max_prefill
        shardings = {"decode": None, "prefill": None, "score": None}
        if mesh is not None:
            decode_mesh.check_model(config, mesh)
            split = decode_mesh.row_split(mesh)
            if n_slots % split:
                raise UserError(f"--max-batch {n_slots} must be a multiple of data x fsdp = {split}: the slots are "
                                "split over those devices")
            param_sh = decode_mesh.param_shardings(config, params, mesh)
            params = jax.device_put(params, param_sh)
            slots, rep = decode_mesh.state_shardings(Slots, mesh, per_row=True), sharding.replicated(mesh)
            shardings = {"decode": ((param_sh, slots, rep), (slots, sharding.batch_sharding(mesh))),
                         "prefill": ((param_sh, slots, rep, rep, rep, rep), slots),
                         "score": ((param_sh, rep), rep),
                         "empty": slots}
        self.params, self._shardings = params, shardings
        jit = lambda what, fn, donate, **static: _jitted(fn, donate, mesh, shardings[what], **static)
        self._decode = {(span, rows): jit("decode", decode_chunk, (1,), config=config, k=chunk, span=span, rows=rows)
                        for span in self.spans() for rows in self.row_counts()}
        self._prefill = jit("prefill", prefill, (1,), config=config)
        self._score = jit("score", score, (), config=config)

    @property
    def compiles(self) -> int:
        return sum(count[0] for _, count in (*self._decode.values(), self._prefill, self._score))

    def empty_slots(self) -> Slots:
        def empty():
            cache = model.KVCache.init(self.config, self.n_slots, self.config.n_positions, per_row=True)
            return Slots(cache=cache, last_B=jnp.zeros(self.n_slots, jnp.int32))

        if self.mesh is None:
            return empty()
        return jax.jit(empty, out_shardings=self._shardings["empty"])()  # created split: never whole on one device

    # -- buckets ---------------------------------------------------------------------------------------------

    def spans(self) -> list[int]:
        """Attention spans of the decode programs: powers of two from a quarter of the context (>= 64) up to it."""
        S = self.config.n_positions
        spans = [S]
        while spans[0] // 2 >= max(64, S // 4):
            spans.insert(0, spans[0] // 2)
        return spans

    def row_counts(self) -> list[int]:
        """Rows a decode program runs: a quarter of the slots (busy rows are packed low) or all of them. With the
        rows split over devices, all of them: the low quarter lives on a few devices, and running it alone would
        move those rows' cache to the others and back."""
        if self.mesh is not None and decode_mesh.row_split(self.mesh) > 1:
            return [self.n_slots]
        return sorted({max(1, self.n_slots // 4), self.n_slots})

    def rows_bucket(self, n: int) -> int:
        return next(r for r in self.row_counts() if r >= n)

    def span_bucket(self, n: int) -> int:
        """The smallest span holding `n` slots."""
        return next((s for s in self.spans() if s >= n), self.config.n_positions)

    def prefix_bucket(self, n: int) -> int:
        return bucket(max(n, 1), self.config.n_positions)

    def prefill_batch(self, n: int) -> int:
        """One prompt alone (the common case at low load: no filler rows), else `max_prefill` rows: two programs
        per prompt bucket instead of one per power of two keep a cold start short."""
        return 1 if n <= 1 else self.max_prefill

    def buckets(self) -> tuple[list[int], list[int]]:
        """(prompt-length buckets, prefill batch buckets): every shape a request can reach."""
        lengths, n = [], 1
        while not lengths or lengths[-1] < self.config.n_positions:
            lengths.append(self.prefix_bucket(n))
            n = lengths[-1] + 1
        batches = sorted({self.prefill_batch(n) for n in range(1, self.max_prefill + 1)})
        return lengths, batches

    def warmup_jobs(self, slots: Slots, knobs: RowKnobs, score: bool = True) -> list:
        """One callable per program and bucket serving can reach, each compiling it for the argument types the
        calls use (so the calls find it compiled), biggest first: they may run in parallel threads."""
        lengths, batches = self.buckets()
        B = self.n_slots
        jobs = [(P * b, self._prefill[0], (self.params, slots, np.zeros((b, P), np.int32), np.zeros(b, np.int32),
                                          np.zeros(b, np.int32), np.full(b, B, np.int32)))
                for P in lengths for b in batches]
        if score:
            jobs += [(P, self._score[0], (self.params, np.zeros((1, P), np.int32))) for P in lengths]
        jobs += [(span * rows, fn, (self.params, slots, knobs)) for (span, rows), (fn, _) in self._decode.items()]
        jobs.sort(key=lambda job: -job[0])
        return [lambda fn=fn, args=args: fn.lower(*args).compile() for _, fn, args in jobs]

    # -- calls -----------------------------------------------------------------------------------------------

    def decode(self, slots: Slots, knobs: RowKnobs, span: int, rows: int):
        return self._decode[(span, rows)][0](self.params, slots, knobs)

    def prefill(self, slots: Slots, tokens_bxP, lengths_b, last_b, rows_b) -> Slots:
        return self._prefill[0](self.params, slots, tokens_bxP, lengths_b, last_b, rows_b)

    def score(self, tokens_bxP):
        return self._score[0](self.params, tokens_bxP)
