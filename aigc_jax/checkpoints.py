"""The checkpoint format of a training workdir: orbax saves of the train state, and reading them back.

Workdir layout:
    run.json          the run's settings: a re-run must match it (see aigc_jax/train/prepare.py); written last at start
    model.json        the model config                          (aigc_jax/modeldir.py)
    tokenizer.json    the tokenizer
    checkpoints/<step>/{params, train_state, meta}   orbax, async, last K kept
    metrics.jsonl     one JSON object per log/eval line

`params` is its own item so inference restores weights without the optimizer state. `meta` holds the step and
the data position; since the batch for step s is a pure function of (seed, s), the step is the position.
"""

from __future__ import annotations

import os
import sys

import jax
import orbax.checkpoint as ocp

from aigc_jax import fileio, model, sharding
from aigc_jax.errors import UserError

CHECKPOINTS = "checkpoints"
RUN_FILE = "run.json"


class Checkpoints:
    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINTS))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        """Dispatches an async save of the state at `step` (training continues while it writes)."""
        state = _global_arrays(state)
        rest = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                train_state=ocp.args.StandardSave(rest),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state):
        """(state, meta) at `step`; `abstract_state` gives structure, dtypes and shardings."""
        rest = {"step": abstract_state.step, "opt_state": abstract_state.opt_state, "rng": abstract_state.rng}
        try:
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_state.params),
                    train_state=ocp.args.StandardRestore(rest),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:  # orbax/tensorstore raise many types for unreadable or mismatched data
            raise UserError(corrupt_message(self.directory, step, e)) from None
        ts = out.train_state
        state = abstract_state.replace(step=ts["step"], params=out.params, opt_state=ts["opt_state"], rng=ts["rng"])
        return state, out.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _global_arrays(tree):
    """Multi-host pmap returns replicated outputs as per-process arrays; orbax needs global ones."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    mesh = sharding.make_mesh()
    convert = lambda x: (multihost_utils.host_local_array_to_global_array(x, mesh, jax.sharding.PartitionSpec())
                         if x.is_fully_addressable else x)
    return jax.tree.map(convert, tree)


def corrupt_message(directory: str, step: int, error: Exception) -> str:
    # orbax reads leaves in concurrent coroutines; when one fails, the others are dropped un-awaited and print
    # "Exception ignored in <coroutine>" tracebacks at garbage collection, after this one-line error. The process
    # is about to stop with that error, so those echoes are dropped.
    sys.unraisablehook = lambda _unraisable: None
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return (f"checkpoint {os.path.join(directory, str(step))} is unreadable or does not match this model "
            f"({first}); delete that step directory to resume from an earlier one, or use a new --workdir")


def latest_step(workdir: str) -> int | None:
    """The newest finished checkpoint step, read from the directory alone (no orbax manager, no collective:
    every process of a multi-host run can call it before they synchronise). Unfinished saves live in
    temporary directories whose names are not plain integers, so they are never picked."""
    directory = os.path.join(workdir, CHECKPOINTS)
    if not os.path.isdir(directory):
        return None
    steps = [int(name) for name in os.listdir(directory) if name.isdigit()]
    return max(steps) if steps else None


def restore_params(workdir: str, config, step: int | None = None, sharding=None):
    """(params, step) of a workdir's latest (or given) checkpoint, whatever topology saved it. `sharding`: one
    jax.sharding.Sharding for every leaf, or a pytree of them; default this process's first device."""
    directory = os.path.join(workdir, CHECKPOINTS)
    if not os.path.isdir(directory):
        raise UserError(f"{workdir} has no checkpoints yet ({directory} is missing)")
    manager = ocp.CheckpointManager(os.path.abspath(directory), options=ocp.CheckpointManagerOptions(create=False))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise UserError(f"{workdir} has no finished checkpoint")
    shapes = jax.eval_shape(lambda: model.init_params(config, jax.random.key(0)))
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(sharding, jax.sharding.Sharding):
        sharding = jax.tree.map(lambda _: sharding, shapes)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, sharding)
    try:
        params = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract))).params
    except Exception as e:
        raise UserError(corrupt_message(directory, step, e)) from None
    return params, step


def read_run_file(workdir: str) -> dict | None:
    path = os.path.join(workdir, RUN_FILE)
    return fileio.read_json(path, "not a training workdir") if os.path.isfile(path) else None


def write_run_file(workdir: str, run: dict) -> None:
    os.makedirs(workdir, exist_ok=True)
    fileio.atomic_write_json(os.path.join(workdir, RUN_FILE), run)
