"""Decoding on a (data, fsdp, tensor) mesh: where weights, the KV cache, prompts and outputs live, and the jit.

    weights   tensor-parallel by sharding.DECODE_RULES: heads, MLP hidden units and the vocabulary split over
              `tensor`, nothing over `fsdp` (decoding reads every weight once per token: gathering FSDP shards
              for every token would be all cost)
    KV cache  rows over data x fsdp, heads over tensor, slots whole: every device attends for its own rows and
              heads, and beam search reorders rows within a prompt's group (KVCache.gather_groups), on-device
    prompts, outputs, loop state   rows over data x fsdp; scalars and knobs replicated

Programs are global-view `jax.jit`s with these in/out shardings, traced with DECODE_RULES active so the models'
`constrain` calls place the activations; XLA inserts the tensor-parallel all-reduces. The generator
(generate.py, `jit_programs`) and the serving engine (serve/programs.py) both place and compile through here.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Mesh, NamedSharding

from aigc_jax import model, sharding
from aigc_jax.errors import UserError
from aigc_jax.models.cache import KVCache

RULES = sharding.DECODE_RULES


def resolve(mesh) -> Mesh:
    """A (data, fsdp, tensor) Mesh from a Mesh, a MeshShape, a "data=D,fsdp=F,tensor=T" string or None (every
    device on data). Decoding runs on one host: its prompts and outputs are that host's."""
    if jax.process_count() > 1:
        raise UserError("decoding on a mesh runs on a single host; run generate/serve in one process")
    if isinstance(mesh, Mesh):
        if tuple(mesh.axis_names) != sharding.AXES:
            raise UserError(f"a decode mesh has the axes {sharding.AXES}, got {tuple(mesh.axis_names)}: "
                            "build it with aigc_jax.sharding.make_mesh")
        return mesh
    return sharding.make_mesh(mesh)


def key(mesh: Mesh | None):
    """What identifies `mesh` in a cache of compiled programs: its shape, axes and devices (None: no mesh)."""
    if mesh is None:
        return None
    return mesh.devices.shape, tuple(mesh.axis_names), tuple(d.id for d in mesh.devices.flat)


def check_model(config, mesh: Mesh) -> None:
    """Tensor parallelism must divide the heads (one-line error otherwise)."""
    sharding.check_heads(mesh, config.n_head, config.n_kv_head)


def row_split(mesh: Mesh) -> int:
    """Devices the rows (batch) are split over: data x fsdp. A batch is padded to a multiple of it."""
    shape = sharding.mesh_shape(mesh)
    return shape.data * shape.fsdp


def param_shardings(config, params, mesh: Mesh):
    """NamedShardings of every parameter (arrays or shapes, in decoding's layout) under DECODE_RULES."""
    fam = model.family(config)
    return sharding.named(mesh, sharding.param_specs(params, fam.param_axes, fam.layer_prefix, RULES, mesh))


def _named(mesh: Mesh, logical) -> NamedSharding:
    # Shapes are not known yet: rows are padded to a multiple of row_split and heads checked by check_model.
    return NamedSharding(mesh, sharding.spec_for(logical, None, RULES, mesh))


def cache_shardings(mesh: Mesh, per_row: bool = False) -> KVCache:
    """A KVCache of NamedShardings: rows over data x fsdp, heads over tensor."""
    return jax.tree.map(lambda ax: _named(mesh, ax), KVCache.logical_axes(per_row),
                        is_leaf=lambda x: isinstance(x, tuple))


def state_shardings(cls, mesh: Mesh, per_row: bool = False):
    """NamedShardings of a decode-state dataclass (search.SampleState, beam.BeamState, serve's Slots): its
    `cache` as cache_shardings, `step` (a scalar) replicated, every other field split along its leading rows."""
    fields = {}
    for f in dataclasses.fields(cls):
        if f.name == "cache":
            fields[f.name] = cache_shardings(mesh, per_row)
        else:
            fields[f.name] = sharding.replicated(mesh) if f.name == "step" else sharding.batch_sharding(mesh)
    return cls(**fields)


def jit(fn, mesh: Mesh, in_shardings, out_shardings, donate_argnums=()):
    """`fn` as a global-view program on `mesh`, traced with the decode rules active."""
    return jax.jit(sharding.traced_with_rules(fn, mesh, RULES), in_shardings=in_shardings,
                   out_shardings=out_shardings, donate_argnums=donate_argnums)


def jit_programs(fns: dict, state_cls, mesh: Mesh, param_shardings) -> dict:
    """program.Program's calls (`fns`: generate, prefill, run) as global-view jits on `mesh`: prompts, outputs and
    the loop state split over rows, the cache also over heads, knobs replicated; the state is handed on (and
    donated) whole."""
    rows, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    state = state_shardings(state_cls, mesh)
    batch_in = (param_shardings, rows, rows, rows, rep)
    return {
        "generate": jit(fns["generate"], mesh, batch_in, (rows, rows, rows)),
        "prefill": jit(fns["prefill"], mesh, batch_in, state),
        "run": jit(fns["run"], mesh, (param_shardings, state, rep, rep), state, donate_argnums=(1,)),
    }
