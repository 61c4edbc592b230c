"""Offline generation: `Generator` buckets and left-pads a batch of prompts and runs the compiled decode program
(program.py) on one device, data-parallel or on a (data, fsdp, tensor) mesh.

    prompts ─▶ left-pad to bucket P ─▶ prefill (one call, fills the KV cache, picks token 0)
            ─▶ lax.while_loop { step: feed latest token ─▶ logits ─▶ select next token }  until max_new_tokens or
               all done
            ─▶ ids [B, N] (pad after EOS)

The step (step.py) and the token choice (sampling.py) are the serving engine's too; what is offline's own is the
scheduling of rows: a batch of prompts, all decoded together until every row is done. The program's functions are
pure, so they run under `jax.jit`, under `jax.pmap` and under `jax.jit(jax.shard_map)` (`parallel.wrap`), as a
global-view jit on a mesh (`mode="mesh"`, tensor-parallel weights: mesh.py), or step by step in plain Python
(`Generator(..., debug=True)`: no jit, every array inspectable). Rows never interact, and each row samples with
its own key (seed, global row index, step), so a row's output does not depend on the batch it is in or on the
number of devices.

Streaming runs the same loop in chunks (`stop` is a traced bound), handing the state back to the host between
chunks without leaving the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import jax
import numpy as np
from jax import lax

from aigc_jax import parallel, sharding
from aigc_jax.configs import ModelConfig
from aigc_jax.decode import mesh as decode_mesh
from aigc_jax.decode.config import GenerationConfig, Strategy, batch_bucket, bucket
from aigc_jax.decode.executables import Entry, Executables
from aigc_jax.decode.program import Program, python_while
from aigc_jax.decode.sampling import make_knobs
from aigc_jax.decode.step import for_decoding
from aigc_jax.errors import UserError

MODES = ("none", *parallel.MODES, "mesh")


# Compiled programs, shared by every Generator: params are arguments, not constants, so loading the same model
# (or another with the same config) again reuses the executables instead of recompiling. Bounded: the least
# recently used go.
_PROGRAMS = Executables()


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
        self._used: dict[int, Entry] = {}

    # -- compilation -------------------------------------------------------------------------------------------

    def _compiled(self, strategy: Strategy, n_tokens: int) -> dict[str, Callable]:
        key = (self.config, strategy, n_tokens, self.mode, decode_mesh.key(self.mesh), self.debug)
        entry = _PROGRAMS.get(key, lambda entry: self._wrap(self._program(strategy, n_tokens), entry))
        self._used[id(entry)] = entry  # held here: an entry evicted from _PROGRAMS still counts its traces
        return entry.value

    def _program(self, strategy: Strategy, n_tokens: int) -> Program:
        return Program(self.config, strategy, n_tokens, loop=python_while if self.debug else lax.while_loop)

    def _wrap(self, program: Program, entry: Entry) -> dict[str, Callable]:
        """The program's three calls, counted as traces of `entry`, jitted for this generator's mode."""
        fns = {name: entry.counted(fn) for name, fn in program.calls(packed=self.mode != "mesh").items()}
        if self.debug:
            return fns
        if self.mode == "none":
            return {
                "generate": jax.jit(fns["generate"]),
                "prefill": jax.jit(fns["prefill"]),
                "run": jax.jit(fns["run"], donate_argnums=(1,)),
            }
        if self.mode == "mesh":
            return decode_mesh.jit_programs(fns, program.search.state, self.mesh, self.param_shardings)
        wrap = lambda fn, in_specs, donate=(): parallel.wrap(fn, self.mode, self.mesh, in_specs, "data", donate)
        batch_in = ("rep", "data", "data", "data", "rep")
        return {
            "generate": wrap(fns["generate"], batch_in),
            "prefill": wrap(fns["prefill"], batch_in),
            "run": wrap(fns["run"], ("rep", "data", "rep", "rep"), (1,)),
        }

    def traces(self) -> int:
        """How often the programs this generator used were traced (= compiled), by it or another generator."""
        return sum(entry.traces for entry in self._used.values())

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
        fns = self._compiled(strategy, N)
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


def trim(ids, eos_ids: Sequence[int]) -> list[int]:
    """ids up to and including the first EOS (all of them if none)."""
    ids = [int(i) for i in ids]
    for j, t in enumerate(ids):
        if t in eos_ids:
            return ids[: j + 1]
    return ids
