"""The serving engine's device programs: prefill prompts into slots, decode a chunk of steps for every slot, score.

    slots (B rows of one KV cache, per-row write index) ──▶ decode chunk: ≤ K steps for all B rows at once
         ▲                                                   (each row at its own length, its own sampling knobs)
         └── prefill: a few new prompts run alone (cache of P slots), then written into free rows

A row of the cache holds one sequence with position p at slot p, so a row's write index is also the position of the
token it feeds next. A new prompt of n tokens prefills its first n-1 tokens (no logits: XLA drops them) and leaves
its last token to feed: the first new token then comes out of an ordinary decode step. Steps are offline
generation's (decode/step.py: one token per row against the cache) and so is the token choice
(decode/sampling.select, each row with its own knobs); only the scheduling of rows is the engine's.

Rows never interact, so a request's tokens do not depend on what else runs. Rows that are empty or finished keep
computing (shapes are fixed) on token 0 at position 0 without advancing: their writes stay finite and inside the
row, which the next prefill overwrites. (Letting them run on would feed positions past the context, where the
position-embedding lookup returns NaN, and a NaN value in a masked slot still poisons probs·v.)

Every program takes the params and the slot state as arguments, and `Programs` is the one place they are jitted
(kept in decode/executables.py's bounded cache, shared by every engine in the process):
on a (data, fsdp, tensor) mesh (`aigc-jax serve --mesh`) the params are placed tensor-parallel and the slot cache
split over rows and heads as the offline Generator's (decode/mesh.py), and the programs jitted with those shardings.

Just over 300 lines because the shape buckets and the programs compiled for them must agree: warm-up compiles
exactly the (span, rows) and prompt buckets the calls later reach, and both are listed here.
"""

from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from aigc_jax import model, sharding
from aigc_jax.decode import mesh as decode_mesh
from aigc_jax.decode import sampling
from aigc_jax.decode.config import Features, bucket
from aigc_jax.decode.executables import Executables
from aigc_jax.decode.sampling import Knobs
from aigc_jax.decode.step import step
from aigc_jax.errors import UserError

TOP_LOGPROBS = 5  # alternatives per token (OpenAI's limit for the completions API)

# What the decode program compiles in: every request's knobs share it. Top-k and top-p always run when some row
# samples (k = the vocabulary and top_p = 1 keep every id); the sampling branch and the log-probabilities are
# skipped (lax.cond) while no row asks for them. The API offers neither min-p nor a repetition penalty.
FEATURES = Features(sample=True, mixed=True, top_k=True, top_p=True, logprobs=True)


@flax.struct.dataclass
class Slots:
    cache: model.KVCache  # [B rows], per-row index
    last_B: jax.Array  # int32: the token each row feeds next


@flax.struct.dataclass
class Schedule:
    """Which rows one decode chunk runs and for how long, built on the host with the chunk's per-row Knobs."""

    active_B: jax.Array  # bool: the row holds a sequence still generating
    budget_B: jax.Array  # int32: tokens it may still generate
    step_B: jax.Array  # int32: tokens it generated so far (the sampling key's step)
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
    top_ids_BxKxT: jax.Array  # int32 [B, K, TOP_LOGPROBS] (zeros unless schedule.logprobs)
    top_logprob_BxKxT: jax.Array


def decode_chunk(params, slots: Slots, knobs: Knobs, schedule: Schedule, *, config, k: int, span: int, rows: int):
    """Up to `schedule.n_steps` (<= k) decode steps for the first `rows` rows (every busy row is among them),
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
        knobs = knobs.first_rows(rows)
        schedule = schedule.replace(**{f.name: getattr(schedule, f.name)[:rows] for f in dataclasses.fields(schedule)
                                       if f.name.endswith("_B")})
    slots, out = _decode_steps(params, slots, knobs, schedule, config=config, k=k)
    if corner:
        # dynamic_update_slice, not .at[:rows, :span].set: XLA's CPU scatter loops element by element.
        put = lambda big, part: lax.dynamic_update_slice(big, part, (0,) * big.ndim)
        c, f = slots.cache, full.cache
        slots = Slots(cache=f.replace(k=put(f.k, c.k), v=put(f.v, c.v), pos=put(f.pos, c.pos),
                                      index=put(f.index, c.index)), last_B=put(full.last_B, slots.last_B))
    return slots, out


def _decode_steps(params, slots: Slots, knobs: Knobs, schedule: Schedule, *, config, k: int):
    B, T = slots.last_B.shape[0], TOP_LOGPROBS
    out = Chunk(
        tokens_BxK=jnp.full((B, k), -1, jnp.int32), n_B=jnp.zeros(B, jnp.int32), eos_B=jnp.zeros(B, bool),
        logprob_BxK=jnp.zeros((B, k), jnp.float32), top_ids_BxKxT=jnp.zeros((B, k, T), jnp.int32),
        top_logprob_BxKxT=jnp.zeros((B, k, T), jnp.float32),
    )

    def finished(o):
        return ~schedule.active_B | o.eos_B | (o.n_B >= schedule.budget_B)

    def cond(carry):
        t, _, o = carry
        someone_done = jnp.any(schedule.active_B & finished(o))
        return (t < schedule.n_steps) & ~jnp.all(finished(o)) & ~(schedule.stop_early & someone_done)

    def body(carry):
        t, s, o = carry
        live_B = ~finished(o)
        index_B = s.cache.index
        logits_BxV, cache = step(params, jnp.where(live_B, s.last_B, 0), jnp.where(live_B, index_B, 0), s.cache,
                                 config)
        cache = cache.replace(index=jnp.where(live_B, cache.index, index_B))
        token_B = sampling.select(logits_BxV, knobs, FEATURES, schedule.step_B + o.n_B, live_B=live_B)
        token_B = jnp.where(live_B, token_B, -1)
        o = o.replace(
            tokens_BxK=o.tokens_BxK.at[:, t].set(token_B),
            n_B=o.n_B + live_B,
            eos_B=o.eos_B | (live_B & schedule.use_eos_B & jnp.isin(token_B, knobs.eos_ids)),
        )
        o = lax.cond(schedule.logprobs, _with_logprobs, lambda o, *_: o, o, logits_BxV, token_B, t)
        return t + 1, s.replace(cache=cache, last_B=jnp.where(live_B, token_B, s.last_B)), o

    _, slots, out = lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), slots, out))
    return slots, out


def _with_logprobs(o: Chunk, logits_BxV, token_B, t) -> Chunk:
    """Step t's log-probability of each chosen token and the TOP_LOGPROBS likeliest, under the model's logits."""
    chosen_B, top_ids_BxT, top_lp_BxT = sampling.token_logprobs(logits_BxV, token_B, TOP_LOGPROBS)
    return o.replace(logprob_BxK=o.logprob_BxK.at[:, t].set(chosen_B),
                     top_ids_BxKxT=o.top_ids_BxKxT.at[:, t].set(top_ids_BxT),
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
    next_bxP = jnp.pad(tokens_bxP[:, 1:], ((0, 0), (0, 1)))  # the last position has no next token
    lp_bxP, top_ids, top_lp = sampling.token_logprobs(logits_bxPxV[..., : config.vocab_size], next_bxP, TOP_LOGPROBS)
    return lp_bxP[:, :-1], top_ids, top_lp


# Jitted programs shared by every engine: params and slots are arguments, so another engine for the same config
# (or the same model loaded again) reuses the executables. Bounded; each entry counts its traces (= compilations).
_JITTED = Executables()


def _jitted(fn, donate: tuple, mesh=None, shardings=None, **static):
    """The cache entry of the jitted `fn` (its value, and its trace count); on a mesh, `shardings` =
    (in_shardings, out_shardings)."""
    key = (fn.__name__, decode_mesh.key(mesh), tuple(sorted(static.items())))

    def build(entry):
        traced = entry.counted(functools.partial(fn, **static))
        if mesh is None:
            return jax.jit(traced, donate_argnums=donate)
        return decode_mesh.jit(traced, mesh, *shardings, donate_argnums=donate)

    return _JITTED.get(key, build)


class Programs:
    """The jitted programs for one model and slot count, and the shape buckets they are compiled for.

    Buckets: prompt prefixes to powers of two (>= 16, <= the context), prefill batches of 1 or `max_prefill`; the
    decode chunk has one program per (attention span, row count): greedy and sampled rows, with or without
    log-probabilities, share it (FEATURES: lax.cond skips the work no row asks for), which cut a cold start's
    programs (with prefill batches of 1 or `max_prefill` only) from 44 to 21 for the 256-token baby model.
    `compiles` counts the compilations of these programs (by this engine or another one for the same config).

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
            shardings = {"decode": ((param_sh, slots, rep, rep), (slots, sharding.batch_sharding(mesh))),
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
        return sum(entry.traces for entry in (*self._decode.values(), self._prefill, self._score))

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

    def warmup_jobs(self, slots: Slots, knobs: Knobs, schedule: Schedule, score: bool = True) -> list:
        """One callable per program and bucket serving can reach, each compiling it for the argument types the
        calls use (so the calls find it compiled), biggest first: they may run in parallel threads."""
        lengths, batches = self.buckets()
        B = self.n_slots
        jobs = [(P * b, self._prefill.value, (self.params, slots, np.zeros((b, P), np.int32), np.zeros(b, np.int32),
                                          np.zeros(b, np.int32), np.full(b, B, np.int32)))
                for P in lengths for b in batches]
        if score:
            jobs += [(P, self._score.value, (self.params, np.zeros((1, P), np.int32))) for P in lengths]
        jobs += [(span * rows, entry.value, (self.params, slots, knobs, schedule))
                 for (span, rows), entry in self._decode.items()]
        jobs.sort(key=lambda job: -job[0])
        return [lambda fn=fn, args=args: fn.lower(*args).compile() for _, fn, args in jobs]

    # -- calls -----------------------------------------------------------------------------------------------

    def decode(self, slots: Slots, knobs: Knobs, schedule: Schedule, span: int, rows: int):
        return self._decode[(span, rows)].value(self.params, slots, knobs, schedule)

    def prefill(self, slots: Slots, tokens_bxP, lengths_b, last_b, rows_b) -> Slots:
        return self._prefill.value(self.params, slots, tokens_bxP, lengths_b, last_b, rows_b)

    def score(self, tokens_bxP):
        return self._score.value(self.params, tokens_bxP)
