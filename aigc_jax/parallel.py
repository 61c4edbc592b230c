"""Running one step function over many devices: the pmap / shard_map data-parallel wrappers, a global-view jit on a
(data, fsdp, tensor) mesh, batch placement, and multi-host start-up.

A *mapped* function sees its device's slice of the batch and reduces across devices by axis name
(`lax.psum(x, AXIS)`): `wrap(fn, "pmap", …)` runs it under `jax.pmap`, `wrap(fn, "shard_map", …)` under
`jax.jit(jax.shard_map(…))` over the mesh's data axis. A *global-view* function sees whole arrays and leaves
partitioning to XLA: `wrap_global(fn, mesh, in_shardings, out_shardings)` jits it with shardings (FSDP and tensor
parallelism, aigc_jax/sharding.py). Tests prove all of them equal a single-device run.

Mapped argument/output specs are the strings "rep" (the same on every device: params, optimizer state, metrics
after pmean) and "data" (split over devices along the leading axis: batches, per-example outputs).
Batch layout differs: pmap takes [local_devices, per_device_batch, …]; shard_map and mesh take one global array
[global_batch, …] split over data (and fsdp). `shard_batch` builds either from this process's rows.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from aigc_jax import sharding
from aigc_jax.errors import UserError

AXIS = "data"
MODES = ("pmap", "shard_map")  # the mapped (manual) data-parallel wrappers
LAYOUTS = (*MODES, "mesh")  # … and the global-view jit on a mesh


def _check_mode(mode: str, modes=MODES) -> None:
    if mode not in modes:
        raise UserError(f"--parallel must be one of {', '.join(modes)}, got {mode!r}")


def wrap(
    fn: Callable,
    mode: str,
    mesh: Mesh,
    in_specs: Sequence[Any],
    out_specs: Any,
    donate_argnums: Sequence[int] = (),
) -> Callable:
    """Wraps per-device `fn` for data parallelism. Specs are pytree prefixes of "rep" / "data"."""
    _check_mode(mode)
    is_leaf = lambda s: s in ("rep", "data")
    if mode == "pmap":
        to_axis = lambda spec: jax.tree.map(lambda s: None if s == "rep" else 0, spec, is_leaf=is_leaf)
        devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
        return jax.pmap(
            fn,
            axis_name=AXIS,
            in_axes=tuple(to_axis(s) for s in in_specs),
            out_axes=to_axis(out_specs),
            donate_argnums=tuple(donate_argnums),
            devices=devices if jax.process_count() == 1 else None,
        )
    to_spec = lambda spec: jax.tree.map(lambda s: P() if s == "rep" else P(AXIS), spec, is_leaf=is_leaf)
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=tuple(to_spec(s) for s in in_specs), out_specs=to_spec(out_specs))
    return jax.jit(mapped, donate_argnums=tuple(donate_argnums))


def wrap_global(fn: Callable, mesh: Mesh, in_shardings, out_shardings, donate_argnums: Sequence[int] = (),
                rules=sharding.TRAIN_RULES) -> Callable:
    """`fn` (global view) jitted on `mesh` with these shardings; its `sharding.constrain` calls apply `rules`.
    Donated inputs must have out_shardings equal to their in_shardings for XLA to reuse their buffers."""
    return jax.jit(sharding.traced_with_rules(fn, mesh, rules), in_shardings=in_shardings,
                   out_shardings=out_shardings, donate_argnums=tuple(donate_argnums))


def local_device_count(mesh: Mesh) -> int:
    return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def shard_batch(local_rows: Any, mode: str, mesh: Mesh) -> Any:
    """This process's rows [local_batch, …] (a pytree of numpy arrays) -> the layout `mode` expects, on device.

    The copy is asynchronous: call it for step n+1 before fetching step n's results to overlap the transfer.
    """
    _check_mode(mode, LAYOUTS)
    n_local = local_device_count(mesh)
    split = sharding.batch_sharding(mesh) if mode == "mesh" else NamedSharding(mesh, P(AXIS))
    n_split = local_batch_shards(mesh) if mode == "mesh" else n_local

    def place(x):
        x = np.asarray(x)
        if x.shape[0] % n_split:
            raise UserError(f"batch of {x.shape[0]} rows does not split over this host's {n_split} batch shards")
        if mode == "pmap":
            x = x.reshape(n_local, x.shape[0] // n_local, *x.shape[1:])
            local_mesh = Mesh(np.asarray([d for d in mesh.devices.flat if d.process_index == jax.process_index()]), (AXIS,))
            return jax.device_put(x, NamedSharding(local_mesh, P(AXIS)))
        return jax.make_array_from_process_local_data(split, x)

    return jax.tree.map(place, local_rows)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree on every device of the mesh (the same value must be given on every process)."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)


def local_batch_shards(mesh: Mesh) -> int:
    """How many distinct pieces of the batch this process's devices hold (data x fsdp; tensor copies repeat)."""
    here = [i for i, d in np.ndenumerate(mesh.devices) if d.process_index == jax.process_index()]
    names = list(mesh.axis_names)
    keep = [names.index(a) for a in sharding.BATCH if a in names]
    return len({tuple(i[k] for k in keep) for i in here})


def gather_rows(x: jax.Array, mode: str) -> np.ndarray:
    """A "data" output back to host rows [local_batch, …] in the order `shard_batch` was given them."""
    if mode == "pmap":
        x = np.asarray(x)
        return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    # With tensor > 1 every batch piece sits on several devices: keep one copy of each.
    shards = sorted((s for s in x.addressable_shards if s.replica_id == 0), key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> None:
    """Multi-host start-up. With no arguments, JAX auto-detects SLURM, Open MPI and TPU pods; explicit values
    (or AIGC_COORDINATOR / AIGC_NUM_PROCESSES / AIGC_PROCESS_ID) cover everything else. CPU processes
    need gloo collectives, switched on here before initialisation."""
    coordinator_address = coordinator_address or os.environ.get("AIGC_COORDINATOR")
    if num_processes is None and "AIGC_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["AIGC_NUM_PROCESSES"])
    if process_id is None and "AIGC_PROCESS_ID" in os.environ:
        process_id = int(os.environ["AIGC_PROCESS_ID"])
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or not _has_accelerator_plugin():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
        )
    except (ValueError, RuntimeError) as e:
        raise UserError(f"jax.distributed.initialize failed ({e}); pass --coordinator, --num-processes, --process-id") from None


def _has_accelerator_plugin() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu"))
