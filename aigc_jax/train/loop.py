"""The training loop: dispatch steps without waiting on the device, from a `Run` that `prepare()` resolved.

The loop dispatches step n, queues the host→device copy of batch n+1, and only then fetches step n-1's metrics,
so the device never idles on the host. Checkpoints are async orbax saves; SIGTERM/SIGINT save and exit; a streak
of non-finite steps halts without touching the last good checkpoint. What it measures goes to a `Recorder`
(record.py); validation is evaluate.py's.
"""

from __future__ import annotations

import functools
import signal
import sys

import jax
import numpy as np

from aigc_jax import checkpoints as ckpt
from aigc_jax import data, sharding
from aigc_jax.errors import UserError
from aigc_jax.train import evaluate
from aigc_jax.train import optimizer as optim
from aigc_jax.train.layout import Layout, memory_plan
from aigc_jax.train.prepare import Run, check_checkpoint_meta, checkpoint_meta, prepare, write_run_files
from aigc_jax.train.record import Recorder

# Library callers prepare and train through this one module, as `aigc-jax train` does.
__all__ = ["Run", "TrainingHalted", "UserError", "prepare", "train"]


class TrainingHalted(UserError):
    """Too many consecutive non-finite steps; the last good checkpoint is left as it was."""


def train(run: Run, log=print) -> dict:
    """Runs (or resumes) training; returns the final metrics. Raises TrainingHalted on a non-finite streak."""
    cfg, mcfg = run.train_config, run.model_config
    if jax.process_count() > 1:
        # Every process has prepared (and so read the workdir) before the primary writes to it.
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("aigc_jax:prepared")

    for note in run.notes:
        log(note)
    optimizer = optim.make(cfg)
    start = run.resume_step or 0
    checkpoints, state, abstract, shardings = _initial_state(run, optimizer, log)
    step_fn = run.layout.train_step(shardings, model_config=mcfg, train_config=cfg, optimizer=optimizer)
    sampler = data.Batches(run.data.train, cfg.seq_len, cfg.batch_size, cfg.seed,
                           jax.process_index(), jax.process_count(), cfg.shift_windows)
    stop = _StopFlag()
    place = functools.partial(_place, run.layout, sampler, stop)
    batch = place(start) if start < cfg.steps else None
    if batch is not None:
        log("compiling the train step (seconds to minutes, once per shape; the compile cache keeps it)")
        _log_memory_plan(step_fn, state, batch, abstract, run.layout, log)
    recorder = Recorder(run, start, log)
    try:
        state, pending, saved = _steps(run, step_fn, state, batch, place, checkpoints, recorder)
        return _finish(run, state, pending, saved, checkpoints, recorder, stop)
    finally:
        stop.restore()
        recorder.close()
        checkpoints.close()


def _initial_state(run: Run, optimizer, log):
    """The run's checkpoints and the state it starts from (restored, or initialised), with its abstract state
    and shardings."""
    cfg, primary = run.train_config, jax.process_index() == 0
    if run.resume_step is None:
        # A fresh start claims the workdir first: killed from here on, the same command starts over or resumes.
        write_run_files(run, primary)
    checkpoints = ckpt.Checkpoints(run.workdir, cfg.keep_checkpoints)
    abstract, shardings = run.layout.abstract_state(optimizer, cfg.seed, run.model_config)
    if run.resume_step is not None:
        # Restored onto this run's layout, whatever layout saved it (orbax reshards).
        state, meta = checkpoints.restore(run.resume_step, abstract)
        check_checkpoint_meta(meta, run, checkpoints.directory)
        log(f"resumed from {checkpoints.directory}/{run.resume_step}")
        write_run_files(run, primary)  # only now: a checkpoint that fails to restore leaves the workdir as it was
    else:
        state, _ = run.layout.initial_state(run.init_params, optimizer, cfg.seed, run.model_config)
    return checkpoints, state, abstract, shardings


def _place(layout: Layout, sampler, stop, step: int):
    rows = sampler.batch(step)
    # This host's stop request travels with its rows; the step reduces it over every host.
    rows["stop"] = np.full(len(rows["tokens"]), 1 if stop.signum else 0, np.int32)
    return layout.place(rows)


def _steps(run: Run, step_fn, state, batch, place, checkpoints, recorder: Recorder):
    """Steps until the last or a stop request. Returns the state, the (step, device metrics) of the last step,
    not yet recorded (or None if no step ran), and the step of the newest checkpoint on disk (or being written)."""
    cfg = run.train_config
    last: dict = {}
    saved = run.resume_step
    pending = None  # (step, device metrics) of the step dispatched before the current one
    for step in range(run.resume_step or 0, cfg.steps):
        state, metrics = step_fn(state, batch)
        if step + 1 < cfg.steps:
            batch = place(step + 1)  # the copy overlaps with the step just dispatched
        if pending is not None:
            last = _record(pending, cfg.halt_after_nonfinite, recorder)
        pending = (step + 1, metrics)
        done = step + 1
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            checkpoints.save(done, state, checkpoint_meta(done, run))
            saved = done
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            recorder.estimate(done, evaluate.periodic(state.params, run))
        if cfg.sample_every and done % cfg.sample_every == 0 and done < cfg.steps:
            recorder.samples(state.params, done)
        if last.get("stop"):  # some host was signalled: every host sees it at this same step and stops here
            break
    return state, pending, saved


def _finish(run: Run, state, pending, saved, checkpoints, recorder: Recorder, stop) -> dict:
    """Records the last step, saves it, exits on a stop request, else validates and samples once more."""
    cfg, start = run.train_config, run.resume_step or 0
    last = _record(pending, cfg.halt_after_nonfinite, recorder) if pending is not None else {}
    final_step = pending[0] if pending else start
    if final_step != saved:
        checkpoints.save(final_step, state, checkpoint_meta(final_step, run))
    checkpoints.wait()
    if stop.signum or last.get("stop"):
        why = f"by signal {stop.signum}" if stop.signum else "because another process was signalled"
        recorder.log(f"stopped {why} at step {final_step}; checkpoint saved. Re-run the same command to continue.")
        sys.exit(128 + (stop.signum or signal.SIGTERM))
    result = {"step": final_step, **{k: last[k] for k in ("loss",) if k in last}}
    if final_step > start or cfg.eval_every:
        final = evaluate.final(state.params, run)
        result.update({f"val_{k}": v for k, v in final.items()})
        recorder.final(final_step, final)
    if cfg.sample_every:
        recorder.samples(state.params, final_step)
    return result


def _record(pending, halt_after: int, recorder: Recorder) -> dict:
    """Fetches a finished step's metrics (the next step is already queued), checks the guard, records them."""
    step, metrics = pending
    values = recorder.fetch(step, metrics)
    if values["nonfinite_streak"] >= halt_after:
        raise TrainingHalted(f"halted at step {step}: {int(values['nonfinite_streak'])} non-finite steps in a row "
                             "(updates skipped); lower --lr or check the data. The last checkpoint is intact.")
    recorder.train(step, values)
    return values


def _log_memory_plan(step_fn, state, batch, abstract, layout: Layout, log) -> None:
    """Compiles the step for these inputs and logs the per-device memory it plans (what `aigc-jax info` predicts
    for this layout). jit keeps the executable, so the first step does not compile again; pmap has no such cache
    and is left to compile on its first call."""
    if layout.mode == "pmap":
        return
    plan = memory_plan(step_fn.lower(state, batch).compile(), abstract)
    log(f"{layout.mode} on mesh {layout.shape}: per device {sharding.human_bytes(plan['params_bytes'])} params + "
        f"{sharding.human_bytes(plan['optimizer_bytes'])} optimizer state; the step plans "
        + ", ".join(f"{k[5:-6]} {sharding.human_bytes(v)}" for k, v in plan.items() if k.startswith("step_")))


class _StopFlag:
    """Turns the first SIGTERM/SIGINT into "save a checkpoint and exit" instead of dying mid-step."""

    def __init__(self):
        self.signum = 0
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        if self.signum:  # a second signal: give up immediately
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}
