"""Named (data, fsdp, tensor) meshes, and the rules that place parameters, optimizer state and activations on them.

    --mesh data=2,fsdp=2,tensor=2      any axis may be omitted (= 1); the product must equal the device count

- **data**: the batch is split, everything else replicated (plain data parallelism; spans hosts).
- **fsdp**: the batch is split *and* parameters/optimizer state are stored split along their "embed" dimension
  (ZeRO-3 / FSDP); XLA all-gathers a layer's weights for compute and reduce-scatters its gradients.
- **tensor**: Megatron-style tensor parallelism: attention heads, MLP hidden units and the vocabulary are split,
  activations between blocks are whole (one all-reduce after each block's row-parallel projection). It stays
  inside a host.

Every parameter leaf has logical axes, declared by its family (`param_axes` of its record in
aigc_jax/models/registry.py: one regex per leaf over its "/"-joined path); a table maps logical axes to mesh axes:
`TRAIN_RULES` (FSDP + tensor) for training, `DECODE_RULES` (tensor only: decoding reads every weight once per token,
so gathering them per step would be all cost) for generation. A dimension that does not divide its mesh axes is
replicated, with a warning; a leaf no rule matches is an error. Optimizer state follows its parameter. Models call
`constrain(x, logical_axes)` at block boundaries; it applies the active rules (set while a step is traced,
`use_rules`) and is a no-op otherwise, so the same model code runs unsharded, under pmap/shard_map, and on any mesh.

Over 300 lines because the mesh, the rules and the gathering dot that applies them inside a layer are one decision
(where each array lives) and change together; `make_mesh` here is the only place a mesh is built.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import dataclasses
import re
import warnings
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from aigc_jax.errors import UserError

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the mesh axes a batch dimension is split over

# logical axis -> mesh axis (or axes), None = replicated.
TRAIN_RULES: dict[str, str | tuple | None] = {
    "batch": BATCH, "vocab": "tensor", "embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
    "head_dim": None, "qkv": None, "norm": None, "layers": None, "positions": None,
}
DECODE_RULES = {**TRAIN_RULES, "embed": None}


@dataclasses.dataclass(frozen=True)
class MeshShape:
    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    @property
    def size(self) -> int:
        return self.data * self.fsdp * self.tensor

    @property
    def data_only(self) -> bool:
        return self.fsdp == self.tensor == 1

    def __str__(self) -> str:
        return f"data={self.data},fsdp={self.fsdp},tensor={self.tensor}"


def parse_mesh(spec: str | None, n_devices: int) -> MeshShape:
    """`"data=2,fsdp=2,tensor=2"` (axes in any order, omitted = 1; empty = every device on data) -> MeshShape."""
    if spec is None or not str(spec).strip():
        return MeshShape(data=n_devices)
    sizes = {}
    for item in str(spec).split(","):
        name, sep, value = item.strip().partition("=")
        if not sep or name.strip() not in AXES:
            raise UserError(f"--mesh {spec}: expected axis=size items with axes {', '.join(AXES)}, e.g. "
                            "data=2,fsdp=2,tensor=2")
        if name.strip() in sizes:
            raise UserError(f"--mesh {spec}: axis {name.strip()} is given twice")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1:
            raise UserError(f"--mesh {spec}: {name.strip()} must be a positive integer, got {value!r}")
        sizes[name.strip()] = size
    shape = MeshShape(**sizes)
    if shape.size != n_devices:
        raise UserError(f"--mesh {spec} has {shape.size} devices ({shape.data}x{shape.fsdp}x{shape.tensor}) but "
                        f"there are {n_devices}: the product of the axes must equal the device count")
    return shape


def make_mesh(shape: MeshShape | str | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over all devices of all processes (or the given ones).

    Devices are ordered by process, so `data` is outermost and spans hosts while `tensor` (innermost) stays inside
    one. Axes are Auto (JAX's make_mesh now defaults to Explicit axes, which turn FSDP matmuls into errors)."""
    devices = list(jax.devices() if devices is None else devices)
    if not isinstance(shape, MeshShape):
        shape = parse_mesh(shape, len(devices))
    if shape.size != len(devices):
        raise UserError(f"mesh {shape} needs {shape.size} devices, have {len(devices)}")
    local = sum(d.process_index == devices[0].process_index for d in devices)
    if local % shape.tensor:
        raise UserError(f"--mesh tensor={shape.tensor} must divide the {local} devices of one host: tensor "
                        "parallelism communicates every layer and stays inside a host")
    devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices, dtype=object).reshape(shape.data, shape.fsdp, shape.tensor), AXES)


def mesh_shape(mesh: Mesh) -> MeshShape:
    return MeshShape(**{a: int(mesh.shape.get(a, 1)) for a in AXES})


def check_heads(mesh: Mesh, n_head: int, n_kv_head: int) -> None:
    """Tensor parallelism splits heads: it must divide them (a split head would straddle devices)."""
    tensor = mesh_shape(mesh).tensor
    for what, n in (("attention heads", n_head), ("key/value heads", n_kv_head)):
        if n % tensor:
            raise UserError(f"--mesh tensor={tensor} does not divide the model's {n} {what}; use a tensor size that "
                            f"divides {n}")


# ------------------------------------------------------------------------------------------------ parameters


def _mesh_axes(rule) -> tuple[str, ...]:
    return () if rule is None else (rule,) if isinstance(rule, str) else tuple(rule)


def spec_for(logical: Sequence[str | None], shape: Sequence[int] | None, rules: Mapping, mesh: Mesh,
             where: str = "", warn: bool = True) -> P:
    """The PartitionSpec of one array: each dim's logical axis through `rules`, replicated where it does not divide
    (warned, unless `warn=False`) or where an earlier dim already uses the mesh axis. `shape=None`: no divisibility
    check (for shardings fixed before the shapes are known; the caller guarantees they divide)."""
    used, out = set(), []
    for name, size in zip(logical, shape if shape is not None else [None] * len(logical)):
        axes = tuple(a for a in _mesh_axes(rules.get(name)) if mesh.shape.get(a, 1) > 1 and a not in used)
        n = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if axes and size is not None and size % n:
            if warn:
                warnings.warn(f"{where}: dimension {name} of size {size} does not divide mesh axes {axes} ({n}); "
                              "replicated instead", stacklevel=2)
            axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def match_axes(keys: Sequence[str], family_axes: Mapping[str, tuple], layer_prefix: str,
               scanned_axis: bool = True) -> tuple:
    """The logical axes of the parameter at path `keys` (unrolled "h_3/…" or scanned "h/…"; the scanned layout's
    leading layer axis is "layers" unless `scanned_axis=False`, e.g. inside the scan where it is sliced off)."""
    scanned = keys[0] == layer_prefix
    name = "/".join([f"{layer_prefix}_0", *keys[1:]] if scanned else keys)
    hits = [axes for pattern, axes in family_axes.items() if re.fullmatch(pattern, name)]
    if len(hits) != 1:
        raise ValueError(f"parameter {'/'.join(keys)}: {len(hits)} sharding rules match (need exactly one)")
    return ("layers", *hits[0]) if scanned and scanned_axis else tuple(hits[0])


def logical_axes(params, family_axes: Mapping[str, tuple], layer_prefix: str):
    """The tree of logical-axis tuples of `params` (arrays or shapes, either layer layout), from a family's
    PARAM_AXES; a leaf matched by no rule (or by a rule of the wrong rank) is an error: nothing is placed by
    accident."""
    def axes_of(path, leaf):
        keys = [getattr(p, "key", str(p)) for p in path]
        axes = match_axes(keys, family_axes, layer_prefix)
        if len(axes) != len(leaf.shape):
            raise ValueError(f"parameter {'/'.join(keys)} has shape {leaf.shape} but its rule names {axes}")
        return axes

    return jax.tree_util.tree_map_with_path(axes_of, params)


def param_specs(params, family_axes: Mapping[str, tuple], layer_prefix: str, rules: Mapping, mesh: Mesh):
    """PartitionSpecs for every parameter leaf under `rules` on `mesh`."""
    axes = logical_axes(params, family_axes, layer_prefix)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf, ax: spec_for(ax, leaf.shape, rules, mesh, jax.tree_util.keystr(path)),
        params, axes, is_leaf=lambda x: hasattr(x, "shape"),
    )


def named(mesh: Mesh, specs):
    """PartitionSpecs -> NamedShardings on `mesh` (a tree, or one spec)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over data x fsdp, the rest whole."""
    return NamedSharding(mesh, P(tuple(a for a in BATCH if mesh.shape.get(a, 1) > 1) or None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded arrays or ShapeDtypeStructs (the largest shard counts)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def memory_report(compiled) -> dict:
    """Per-device bytes XLA planned for a compiled program (`jit(...).lower(...).compile()`): arguments, outputs,
    their aliased (donated) part, temporaries, and the peak these imply (args + outputs - aliased + temporaries)."""
    m = compiled.memory_analysis()
    if m is None:  # some backends plan no memory up front
        return {}
    out = {k: int(getattr(m, f"{k}_size_in_bytes", 0)) for k in ("argument", "output", "alias", "temp")}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


# ------------------------------------------------------------------------------------------------ activations

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("aigc_jax_sharding_rules", default=None)


@contextlib.contextmanager
def use_rules(mesh: Mesh | None, rules: Mapping | None):
    """Makes `constrain` apply `rules` on `mesh` while a step is traced (None: constrain nothing)."""
    token = _ACTIVE.set(None if mesh is None or rules is None else (mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def traced_with_rules(fn, mesh: Mesh | None, rules: Mapping | None):
    """`fn` with `use_rules(mesh, rules)` active whenever it runs (jit traces it lazily, on its first call)."""
    def wrapped(*args, **kwargs):
        with use_rules(mesh, rules):
            return fn(*args, **kwargs)

    return wrapped


def gathered(w: jax.Array, logical: Sequence[str | None], lookup: bool = False) -> jax.Array:
    """A weight in its compute layout under the active rules: split as stored except along fsdp. FSDP stores a
    layer's weights split and gathers them for its matmuls; without this, XLA may instead split the *activations*
    along embed and then cannot return them to the batch split without an "involuntary full rematerialization".
    A matmul weight's gradient goes back to the stored layout at once (`_resharded`), so the sum over the batch
    shards is a reduce-scatter, not an all-reduce of the whole gradient and a slice. A `lookup` table's gradient
    (a scatter-add of activation rows) keeps the compute layout: split along embed, the scatter would need the
    activations split along embed too, which XLA can reach only by rematerializing them whole."""
    active = _ACTIVE.get()
    if active is None:
        return w
    mesh, rules = active
    compute_rules = {k: tuple(a for a in _mesh_axes(v) if a != "fsdp") or None for k, v in rules.items()}
    compute = NamedSharding(mesh, spec_for(logical, w.shape, compute_rules, mesh, "weight"))
    if lookup:
        return jax.lax.with_sharding_constraint(w, compute)
    stored = NamedSharding(mesh, spec_for(logical, w.shape, rules, mesh, "weight", warn=False))
    return _resharded(w, compute, stored)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _resharded(w, forward: NamedSharding, backward: NamedSharding):
    """`w` laid out as `forward`; its cotangent laid out as `backward` (with_sharding_constraint alone would give
    the cotangent the forward layout)."""
    return jax.lax.with_sharding_constraint(w, forward)


def _resharded_fwd(w, forward, backward):
    return jax.lax.with_sharding_constraint(w, forward), None


def _resharded_bwd(forward, backward, _, g):
    return (jax.lax.with_sharding_constraint(g, backward),)


_resharded.defvjp(_resharded_fwd, _resharded_bwd)


def gathering_dot(path: Sequence[str], family_axes: Mapping[str, tuple], layer_prefix: str):
    """A `dot_general` for a Flax Dense layer at `path` (its kernel's path without "kernel") that first brings the
    kernel into its compute layout (`gathered`), by the kernel's logical axes in the family's PARAM_AXES."""
    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        if _ACTIVE.get() is not None:
            rhs = gathered(rhs, match_axes([*path, "kernel"], family_axes, layer_prefix, scanned_axis=False))
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)

    return dot_general


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """A sharding constraint by logical axis names under the active rules; `x` unchanged when none are active."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    # Activations that do not divide stay whole without a warning: a prefill of one prompt on a batch-split mesh
    # is ordinary, and it would warn at every trace.
    spec = spec_for(logical, x.shape, rules, mesh, "activation", warn=False)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
