"""Prefill + on-device decode loop, single-device, data-parallel or on a (data, fsdp, tensor) mesh, compiled once
per shape bucket.

    prompts ─▶ left-pad to bucket P ─▶ prefill (one call, fills the KV cache, picks token 0)
            ─▶ lax.while_loop { feed latest token ─▶ logits ─▶ pick next token }  until max_new_tokens or all done
            ─▶ ids [B, N] (pad after EOS)

The loop state is a `flax.struct.dataclass` (`SampleState` here, `beam.BeamState` for beams) advanced by pure
functions, so the same `Program` runs under `jax.jit`, under `jax.pmap` and under `jax.jit(jax.shard_map)`
(`parallel.wrap`), as a global-view jit on a mesh (`mode="mesh"`, tensor-parallel weights: decode/mesh.py), or
step by step in plain Python (`Generator(..., debug=True)`: no jit, every array inspectable).
Rows never interact, and each row samples with its own key (seed, global row index, step), so a row's output
does not depend on the batch it is in or on the number of devices.

Streaming runs the same loop in chunks (`stop` is a traced bound), handing the state back to the host between
chunks without leaving the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from aigc_jax import configs, model, parallel, sharding
from aigc_jax.configs import ModelConfig
from aigc_jax.decode import beam
from aigc_jax.decode import mesh as decode_mesh
from aigc_jax.decode.config import GenerationConfig, Strategy, batch_bucket, bucket
from aigc_jax.decode.sampling import (Knobs, make_knobs, mark_seen, penalize, row_keys, sample, seen_in_prompts,
                                     suppress_eos, warp)
from aigc_jax.errors import UserError

MODES = ("none", *parallel.MODES, "mesh")


# ------------------------------------------------------------------------------------------------ greedy & sampling


@flax.struct.dataclass
class SampleState:
    cache: model.KVCache
    next_pos_R: jax.Array  # [B] position at which the latest token is fed (R = rows, as in beam.BeamState)
    tokens_BxN: jax.Array  # generated ids; pad after a row finished and beyond `step`
    finished_B: jax.Array  # bool: emitted an EOS (filler rows start finished)
    row_ids_B: jax.Array  # global row index (seeds the row's samples); -1 for filler rows
    seen_BxV: jax.Array  # bool: ids in the prompt or generated (the repetition penalty's); [B, 0] without it
    logprobs_BxN: jax.Array  # f32: each generated id's raw log-probability (zeros unless strategy.logprobs)
    step: jax.Array  # [] tokens generated so far


def _sample_init(cache, logits_BxV, next_pos_B, row_ids_B, seen_BxV, knobs, strategy, n_tokens):
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
    t = state.step
    scores_BxV = penalize(logits_BxV, state.seen_BxV, knobs.repetition_penalty) if strategy.use_penalty else logits_BxV
    scores_BxV = suppress_eos(scores_BxV, knobs.eos_ids, t < knobs.min_new_tokens)
    if strategy.kind == "greedy":
        token_B = jnp.argmax(scores_BxV, axis=-1).astype(jnp.int32)
    else:
        scores_BxV = warp(scores_BxV, knobs, strategy.use_top_k, strategy.use_top_p, strategy.use_min_p)
        token_B = sample(scores_BxV, row_keys(knobs.seed, state.row_ids_B, t))
    token_B = jnp.where(state.finished_B, knobs.pad_id, token_B)
    put = lambda buf_BxN, x_B: lax.dynamic_update_slice_in_dim(buf_BxN, x_B[:, None], t, axis=1)
    if strategy.use_penalty:
        state = state.replace(seen_BxV=mark_seen(state.seen_BxV, token_B))
    if strategy.logprobs:
        logprob_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV), token_B[:, None], axis=-1)[:, 0]
        state = state.replace(logprobs_BxN=put(state.logprobs_BxN, jnp.where(state.finished_B, 0.0, logprob_B)))
    finished_B = state.finished_B | jnp.isin(token_B, knobs.eos_ids)
    return state.replace(tokens_BxN=put(state.tokens_BxN, token_B), finished_B=finished_B, step=t + 1)


def _sample_last_tokens(state: SampleState):
    return lax.dynamic_slice_in_dim(state.tokens_BxN, state.step - 1, 1, axis=1)[:, 0]


class _Search:
    """The five functions a decoding strategy provides to the shared loop, and the class of its state."""

    def __init__(self, state, init, select, last_tokens, done, result):
        self.state = state
        self.init, self.select, self.last_tokens, self.done, self.result = init, select, last_tokens, done, result


_SAMPLE = _Search(
    state=SampleState,
    init=_sample_init,
    select=_sample_select,
    last_tokens=_sample_last_tokens,
    done=lambda state, knobs: state.finished_B,
    result=lambda state, strategy: (state.tokens_BxN, jnp.zeros(state.tokens_BxN.shape[0], jnp.float32),
                                    state.logprobs_BxN),
)
_BEAM = _Search(beam.BeamState, beam.init, beam.select, beam.last_tokens, beam.done, beam.result)


# ------------------------------------------------------------------------------------------------ per-device program


def _python_while(cond, body, state):
    """lax.while_loop's semantics in plain Python: the debug path."""
    while bool(cond(state)):
        state = body(state)
    return state


class Program:
    """Per-device decode functions for one model config, strategy and token bucket N (shapes do the rest)."""

    def __init__(self, config: ModelConfig, strategy: Strategy, n_tokens: int, loop=lax.while_loop):
        self.config, self.strategy, self.n_tokens, self.loop = config, strategy, n_tokens, loop
        self.search = _BEAM if strategy.kind == "beam" else _SAMPLE
        self.traces = 0  # bumped at trace time only: tests count compilations with it

    def prefill(self, params, tokens_BxP, mask_BxP, row_ids_B, knobs: Knobs):
        """Runs the left-padded prompts through the model in one call and picks the first new token."""
        self.traces += 1
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
        seen_BxV = (seen_in_prompts(tokens_BxP, mask_BxP, cfg.vocab_size) if self.strategy.use_penalty
                    else jnp.zeros((B, 0), bool))
        return self.search.init(cache, logits_BxV, next_pos_B, row_ids_B, seen_BxV, knobs, self.strategy,
                                self.n_tokens)

    def run(self, params, state, knobs: Knobs, stop):
        """Decodes until `stop` tokens were generated (traced: one executable for every chunk) or all rows are done."""
        self.traces += 1
        cfg, search, strategy = self.config, self.search, self.strategy

        def cond(s):
            return (s.step < stop) & ~jnp.all(search.done(s, knobs))

        def body(s):
            logits_Rx1xV, cache = model.forward(
                params, search.last_tokens(s)[:, None], cfg, positions_BxT=s.next_pos_R[:, None], cache=s.cache
            )
            s = s.replace(cache=cache, next_pos_R=s.next_pos_R + 1)
            return search.select(s, logits_Rx1xV[:, 0, : cfg.vocab_size], knobs, strategy)

        return self.loop(cond, body, state)

    def generate(self, params, tokens_BxP, mask_BxP, row_ids_B, knobs: Knobs):
        """Prefill + the whole loop in one call: (ids [R, N], scores [R] (beam search; zeros otherwise), raw
        log-probabilities [R, N]); R = B, or B * num_return for beam search (a prompt's hypotheses consecutive)."""
        state = self.prefill(params, tokens_BxP, mask_BxP, row_ids_B, knobs)
        return self.search.result(self.run(params, state, knobs, knobs.max_new_tokens), self.strategy)

    # Streaming hands the state across the device boundary, where every leaf must split like the batch:
    # per-device scalars (step, cache index) travel as a [1] per device.
    def prefill_packed(self, *args):
        return _pack(self.prefill(*args))

    def run_packed(self, params, packed, knobs, stop):
        return _pack(self.run(params, _unpack(packed), knobs, stop))


@flax.struct.dataclass
class _PerDevice:
    value: jax.Array  # [1]: one device's scalar


def _pack(state):
    return jax.tree.map(lambda x: _PerDevice(x[None]) if x.ndim == 0 else x, state)


def _unpack(state):
    is_packed = lambda x: isinstance(x, _PerDevice)
    return jax.tree.map(lambda x: x.value[0] if is_packed(x) else x, state, is_leaf=is_packed)



# ------------------------------------------------------------------------------------------------ host side


def decoding_config(config: ModelConfig, cast_params: bool = True) -> ModelConfig:
    """The config every decoder runs (see for_decoding)."""
    # Decoding runs the unrolled layer layout: with scanned layers every token slices each layer's weights
    # and cache out of the stacked arrays (measured 2x slower on CPU).
    config = configs.resolve_dtype(config.replace(scan_layers=False))
    if cast_params:
        # Serving needs no fp32 master weights: weights in the compute dtype halve the bytes each token reads
        # (Dense and Embed cast them to that dtype before use anyway).
        config = config.replace(param_dtype=config.dtype)
    return config


def for_decoding(config: ModelConfig, params, cast_params: bool = True):
    """(config, params) as every decoder (this Generator, the serving engine) runs them."""
    before = configs.resolve_dtype(config).param_dtype
    config = decoding_config(config, cast_params)
    params = model.match_layout(params, config)
    if config.param_dtype != before:
        params = jax.tree.map(lambda x: x.astype(config.param_dtype), params)
    return config, params

# Compiled programs, shared by every Generator: params are arguments, not constants, so loading the same model
# (or another with the same config) again reuses the executables instead of recompiling.
_PROGRAMS: dict[tuple, tuple[Program, dict[str, Callable]]] = {}


class Padded(NamedTuple):
    tokens: np.ndarray  # [rows, max_new_tokens] int32, the pad id after EOS
    scores: np.ndarray  # [rows] f32: beam search's length-penalised score (zeros otherwise)
    logprobs: np.ndarray | None  # [rows, max_new_tokens] f32 raw log-probabilities (with gen.logprobs; 0 after EOS)


class Generator:
    """Compiled decoding for one model. Executables are cached per (config, strategy, batch bucket, P, N), see
    config.py, and shared with other Generators.

    mode: "none" (one device, jax.jit), "pmap" or "shard_map" (the batch split over `mesh`'s devices, see
    parallel.py), or "mesh": weights tensor-parallel and the KV cache split over heads and rows on a (data, fsdp,
    tensor) mesh (decode/mesh.py); `mesh` is then a sharding.make_mesh Mesh, a MeshShape or a
    "data=D,fsdp=F,tensor=T" string (None: every device on data).
    debug: no jit at all; the loop runs in plain Python (single device only).
    """

    def __init__(self, config: ModelConfig, params, mode: str = "none", mesh=None, debug: bool = False,
                 cast_params: bool = True):
        if mode not in MODES:
            raise UserError(f"--parallel must be one of {', '.join(MODES)}, got {mode!r}")
        if debug and mode != "none":
            raise UserError("the debug (plain Python) decode path runs on one device: use mode='none'")
        config, params = for_decoding(config, params, cast_params)
        self.config, self.mode, self.debug = config, mode, debug
        self.params = params
        self.row_multiple = 1  # batches are padded to a multiple of the devices the rows are split over
        if mode == "none":
            self.mesh, self.n_devices = None, 1
        elif mode == "mesh":
            self.mesh = decode_mesh.resolve(mesh)
            decode_mesh.check_model(config, self.mesh)
            self.n_devices, self.row_multiple = self.mesh.size, decode_mesh.row_split(self.mesh)
            self.param_shardings = decode_mesh.param_shardings(config, params, self.mesh)
            self.params = jax.device_put(params, self.param_shardings)
        else:
            if jax.process_count() > 1:
                raise UserError("decoding splits the batch over one host's devices; run generate on a single host")
            self.mesh = mesh if mesh is not None else sharding.make_mesh()
            self.n_devices = self.row_multiple = parallel.local_device_count(self.mesh)
            if mode == "shard_map":  # placed once, not per call
                self.params = parallel.replicate(self.params, self.mesh)
        self._used: set[tuple] = set()

    # -- compilation -------------------------------------------------------------------------------------------

    def _compiled(self, strategy: Strategy, n_tokens: int) -> tuple[Program, dict[str, Callable]]:
        key = (self.config, strategy, n_tokens, self.mode, decode_mesh.key(self.mesh), self.debug)
        if key not in _PROGRAMS:
            program = Program(self.config, strategy, n_tokens, loop=_python_while if self.debug else lax.while_loop)
            _PROGRAMS[key] = (program, self._wrap(program))
        self._used.add(key)
        return _PROGRAMS[key]

    def _wrap(self, program: Program) -> dict[str, Callable]:
        fns = {"generate": program.generate, "prefill": program.prefill_packed, "run": program.run_packed}
        if self.debug:
            return fns
        if self.mode == "none":
            return {
                "generate": jax.jit(fns["generate"]),
                "prefill": jax.jit(fns["prefill"]),
                "run": jax.jit(fns["run"], donate_argnums=(1,)),
            }
        if self.mode == "mesh":
            return mesh_programs(program, self.mesh, self.param_shardings)
        wrap = lambda fn, in_specs, donate=(): parallel.wrap(fn, self.mode, self.mesh, in_specs, "data", donate)
        batch_in = ("rep", "data", "data", "data", "rep")
        return {
            "generate": wrap(fns["generate"], batch_in),
            "prefill": wrap(fns["prefill"], batch_in),
            "run": wrap(fns["run"], ("rep", "data", "rep", "rep"), (1,)),
        }

    def traces(self) -> int:
        """How often the programs this generator used were traced (= compiled), by it or another generator."""
        return sum(_PROGRAMS[key][0].traces for key in self._used)

    # -- inputs and outputs ------------------------------------------------------------------------------------

    def _prepare(self, prompts: Sequence[Sequence[int]], gen: GenerationConfig):
        """Checks, buckets, left-pads and places a batch: (fns, device inputs, knobs, rows of output). Sampling
        with num_return_sequences = n repeats each prompt n times (rows p*n + j, each with its own key), as HF."""
        cfg = self.config
        if not len(prompts):
            raise UserError("no prompts given")
        prompts = [list(map(int, p)) for p in prompts]
        gen = gen.with_seed()
        gen.check(cfg.n_positions, cfg.vocab_size, [len(p) for p in prompts])
        if gen.is_sampling:
            prompts = [p for p in prompts for _ in range(gen.num_return_sequences)]
        bad = next((t for p in prompts for t in p if not 0 <= t < cfg.vocab_size), None)
        if bad is not None:
            raise UserError(f"token id {bad} is outside the model's vocabulary [0, {cfg.vocab_size})")
        strategy = Strategy.of(gen)
        P = bucket(max(map(len, prompts)), cfg.n_positions)
        N = bucket(gen.max_new_tokens, cfg.n_positions)
        B = len(prompts)
        rows = batch_bucket(B, self.row_multiple)
        tokens_BxP = np.full((rows, P), gen.pad, np.int32)
        mask_BxP = np.zeros((rows, P), bool)
        mask_BxP[B:, -1] = True  # filler rows: one pad token, and they start finished
        for i, p in enumerate(prompts):
            tokens_BxP[i, P - len(p):] = p
            mask_BxP[i, P - len(p):] = True
        row_ids_B = np.where(np.arange(rows) < B, np.arange(rows), -1).astype(np.int32)
        batch = (tokens_BxP, mask_BxP, row_ids_B)
        if self.mode == "mesh":
            batch = jax.device_put(batch, sharding.batch_sharding(self.mesh))
        elif self.mode != "none":
            batch = parallel.shard_batch(batch, self.mode, self.mesh)
        _, fns = self._compiled(strategy, N)
        return fns, batch, make_knobs(gen, N), B * (1 if gen.is_sampling else gen.num_return_sequences)

    def _rows(self, x) -> np.ndarray:
        return np.asarray(x) if self.mode in ("none", "mesh") else parallel.gather_rows(x, self.mode)

    # -- public ------------------------------------------------------------------------------------------------

    def decode_padded(self, prompts: Sequence[Sequence[int]], gen: GenerationConfig,
                      until: Callable[[np.ndarray], bool] | None = None, chunk: int = 16) -> "Padded":
        """Every output row padded to max_new_tokens (len(prompts) * num_return_sequences rows, a prompt's
        sequences consecutive). `until` (greedy and sampling): called with the ids so far [rows, n] every `chunk`
        tokens; decoding stops early when it returns True (e.g. every row has reached a stop string)."""
        if until is None or gen.strategy_kind == "beam":
            fns, batch, knobs, R = self._prepare(prompts, gen)
            tokens_RxN, scores_R, logprobs_RxN = fns["generate"](self.params, *batch, knobs)
            return Padded(self._rows(tokens_RxN)[:R, : gen.max_new_tokens], self._rows(scores_R)[:R],
                          self._rows(logprobs_RxN)[:R, : gen.max_new_tokens] if gen.logprobs else None)
        for state, n, R in self._chunks(prompts, gen, chunk):
            tokens_RxN = self._rows(state.tokens_BxN)[:R, : gen.max_new_tokens]
            if until(tokens_RxN[:, :n]):
                break
        logprobs = self._rows(state.logprobs_BxN)[:R, : gen.max_new_tokens] if gen.logprobs else None
        return Padded(tokens_RxN, np.zeros(R, np.float32), logprobs)

    def generate_padded(self, prompts: Sequence[Sequence[int]], gen: GenerationConfig):
        """(ids [rows, max_new_tokens] with the pad id after EOS, scores [rows] (beams only)); rows as decode_padded."""
        out = self.decode_padded(prompts, gen)
        return out.tokens, out.scores

    def generate(self, prompts: Sequence[Sequence[int]], gen: GenerationConfig) -> list[list[int]]:
        """The generated ids of each output row (see decode_padded), up to and including its first EOS."""
        tokens, _ = self.generate_padded(prompts, gen)
        return [trim(row, gen.eos_ids) for row in tokens]

    def _chunks(self, prompts, gen: GenerationConfig, chunk: int) -> Iterator[tuple]:
        """(loop state, tokens generated, output rows) after every `chunk` tokens, until max_new_tokens; the loop
        stays on device in between, and the state is the host's to read."""
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise UserError(f"--chunk must be a positive integer, got {chunk!r}")
        fns, batch, knobs, R = self._prepare(prompts, gen)
        state = fns["prefill"](self.params, *batch, knobs)
        stop = 0
        while stop < gen.max_new_tokens:
            stop = min((stop // chunk + 1) * chunk, gen.max_new_tokens)  # the first chunk includes the prefill's token
            state = fns["run"](self.params, state, knobs, np.int32(stop))
            yield state, stop, R

    def stream(
        self, prompts: Sequence[Sequence[int]], gen: GenerationConfig, chunk: int = 16
    ) -> Iterator[list[list[int]]]:
        """Yields each output row's newly generated ids every `chunk` tokens (the loop stays on device in between).

        Rows stop contributing after their EOS (which is included). Greedy and sampling only.
        """
        if gen.strategy_kind == "beam":
            raise UserError("streaming works with greedy decoding and sampling, not beam search (its best beam moves)")
        shown = done = None
        for state, stop, R in self._chunks(prompts, gen, chunk):
            if shown is None:
                shown, done = [0] * R, [False] * R
            tokens = self._rows(state.tokens_BxN)[:R, :stop]
            new = []
            for i, row in enumerate(tokens):
                ids = [] if done[i] else trim(row[shown[i]:], gen.eos_ids)
                shown[i] += len(ids)
                done[i] = done[i] or (bool(ids) and ids[-1] in gen.eos_ids)
                new.append(ids)
            yield new
            if all(done):
                return

    def lower(self, prompts: Sequence[Sequence[int]], gen: GenerationConfig, program: str = "generate"):
        """The `jax.stages.Lowered` of one of this batch's programs: "generate" (prefill + loop), "prefill" or "run"
        (the decode loop alone), e.g. to read its compiled HLO (`.compile().as_text()`) or memory_analysis()."""
        if self.debug:
            raise UserError("the debug decode path is not compiled: there is nothing to lower")
        fns, batch, knobs, _ = self._prepare(prompts, gen)
        if program == "run":
            state = jax.eval_shape(fns["prefill"], self.params, *batch, knobs)
            return fns["run"].lower(self.params, state, knobs, np.int32(gen.max_new_tokens))
        return fns[program].lower(self.params, *batch, knobs)

    def compiled_call(self, prompts: Sequence[Sequence[int]], gen: GenerationConfig) -> Callable:
        """For timing: `f(max_new_tokens=None) -> ids on device` with the batch and knobs already on device (call
        `.block_until_ready()` on the result). Any max_new_tokens in gen's bucket reuses the executable."""
        gen = gen.with_seed()
        fns, batch, knobs, _ = self._prepare(prompts, gen)
        n_bucket = knobs.length_norm.shape[0] - 1
        if self.mode == "none":
            batch = jax.device_put(batch)
        placed = {}

        def call(max_new_tokens: int | None = None):
            n = max_new_tokens or gen.max_new_tokens
            if n not in placed:
                k = make_knobs(gen.replace(max_new_tokens=n), n_bucket)
                placed[n] = (parallel.replicate(k, self.mesh) if self.mode in ("shard_map", "mesh")
                             else jax.device_put(k))
            return fns["generate"](self.params, *batch, placed[n])[0]

        return call


def mesh_programs(program: Program, mesh, param_shardings) -> dict[str, Callable]:
    """`program`'s calls as global-view jits on a (data, fsdp, tensor) mesh: prompts, outputs and the loop state
    split over rows, the cache also over heads, knobs replicated; the state is handed on (and donated) whole."""
    rows, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    state = decode_mesh.state_shardings(program.search.state, mesh)
    batch_in = (param_shardings, rows, rows, rows, rep)
    return {
        "generate": decode_mesh.jit(program.generate, mesh, batch_in, (rows, rows, rows)),
        "prefill": decode_mesh.jit(program.prefill, mesh, batch_in, state),
        "run": decode_mesh.jit(program.run, mesh, (param_shardings, state, rep, rep), state, donate_argnums=(1,)),
    }


def trim(ids, eos_ids: Sequence[int]) -> list[int]:
    """ids up to and including the first EOS (all of them if none)."""
    ids = [int(i) for i in ids]
    for j, t in enumerate(ids):
        if t in eos_ids:
            return ids[: j + 1]
    return ids


def time_decode(
    generator: Generator, batch_size: int, prompt_len: int, new_tokens: int, repeats: int = 3, seed: int = 0
) -> dict:
    """Greedy decode timings on random prompts, EOS disabled so every row runs all `new_tokens` steps.

    Returns the first call's time (compile + one run, unless this bucket was compiled before), the
    best-of-`repeats` wall time of prefill + decode, of the prefill alone (same
    executable with max_new_tokens=1), ms per decoded token (decode steps only, i.e. (total - prefill) /
    (new_tokens - 1)) and generated tokens/s over the whole call (batch * new_tokens / total).
    """
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, generator.config.vocab_size, (batch_size, prompt_len)).tolist()
    gen = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, eos_ids=())
    call = generator.compiled_call(prompts, gen)

    def best(n_new):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            call(n_new).block_until_ready()
            times.append(time.perf_counter() - t0)
        return min(times)

    t0 = time.perf_counter()
    call().block_until_ready()
    first_call_s = time.perf_counter() - t0
    total_s, prefill_s = best(new_tokens), best(1)
    return {
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "first_call_s": first_call_s,
        "total_s": total_s,
        "prefill_s": prefill_s,
        "ms_per_token": 1000 * (total_s - prefill_s) / max(new_tokens - 1, 1),
        "tokens_per_s": batch_size * new_tokens / total_s,
        "parallel": generator.mode,
        "devices": generator.n_devices,
        "backend": jax.default_backend(),
    }
