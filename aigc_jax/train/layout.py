"""Where a run's train state and batches live, and its steps compiled for that.

Three layouts of the one step body (aigc_jax/train/step.py):
- `pmap`, `shard_map`: data parallelism, the step mapped over the mesh's data axis; state replicated.
- `mesh`: a global-view jit on a (data, fsdp, tensor) mesh: parameters and optimizer state are stored sharded by
  the family's logical axes under `sharding.TRAIN_RULES` (FSDP over fsdp, Megatron tensor parallelism over tensor),
  created sharded (`jit(init, out_shardings=…)`: never whole on one device), batches split over data x fsdp, the
  step jitted with in/out shardings and the state donated.
`train.parallel=auto` picks pmap for a data-only mesh (the numbers of every earlier run) and mesh otherwise.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from aigc_jax import model, parallel, sharding
from aigc_jax.errors import UserError
from aigc_jax.train.step import TrainState, eval_step, init_state, train_step


@dataclasses.dataclass(frozen=True)
class Layout:
    mode: str  # pmap | shard_map | mesh
    mesh: Mesh
    shape: sharding.MeshShape

    @classmethod
    def resolve(cls, train_config, model_config, n_devices: int | None = None) -> "Layout":
        """The layout a train config asks for on this machine, checked against the model and batch (one-line errors)."""
        n = jax.device_count() if n_devices is None else n_devices
        shape = sharding.parse_mesh(train_config.mesh, n)
        mode = train_config.parallel
        if mode == "auto":
            mode = "pmap" if shape.data_only else "mesh"
        if mode in parallel.MODES and not shape.data_only:
            raise UserError(f"--parallel {mode} is data parallelism only; --mesh {shape} needs --parallel mesh "
                            "(or auto)")
        rows = train_config.batch_size // train_config.grad_accum
        split = shape.data * shape.fsdp if mode == "mesh" else n
        if rows % split:
            raise UserError(f"--batch-size {train_config.batch_size} / grad_accum {train_config.grad_accum} = {rows} "
                            f"rows per micro-batch must divide over the {split} batch shards of --mesh {shape}")
        mesh = sharding.make_mesh(shape)
        sharding.check_heads(mesh, model_config.n_head, model_config.n_kv_head)
        return cls(mode, mesh, shape)

    # -- where things live -----------------------------------------------------------------------------------

    def param_shardings(self, abstract_params, model_config):
        if self.mode != "mesh":
            return jax.tree.map(lambda _: sharding.replicated(self.mesh), abstract_params)
        family = model.family(model_config)
        specs = sharding.param_specs(abstract_params, family.param_axes, family.layer_prefix, sharding.TRAIN_RULES,
                                     self.mesh)
        return sharding.named(self.mesh, specs)

    def state_shardings(self, abstract_state: TrainState, optimizer, model_config) -> TrainState:
        """Optimizer state follows its parameter; counters, the rng and the step are replicated."""
        params = self.param_shardings(abstract_state.params, model_config)
        rep = sharding.replicated(self.mesh)
        opt = optax.tree_utils.tree_map_params(optimizer, lambda _, s: s, abstract_state.opt_state, params,
                                               transform_non_params=lambda _: rep,
                                               is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
        return TrainState(step=rep, params=params, opt_state=opt, rng=rep)

    def place(self, rows: dict):
        """This process's rows of a batch, on its devices (asynchronous)."""
        return parallel.shard_batch(rows, self.mode, self.mesh)

    # -- compiled steps --------------------------------------------------------------------------------------

    def initial_state(self, given_params, optimizer, seed: int, model_config) -> tuple[TrainState, TrainState]:
        """(the state, its shardings), created where it lives: `given_params` (fine-tuning weights, on the host) or
        a random init from `seed`, then the optimizer state beside them."""
        random_params = lambda: model.init_params(model_config, jax.random.key(seed))
        abstract_params = jax.eval_shape(random_params)
        abstract = jax.eval_shape(lambda p: init_state(p, optimizer, seed), abstract_params)
        shardings = self.state_shardings(abstract, optimizer, model_config)
        if given_params is None:
            params = jax.jit(random_params, out_shardings=shardings.params)()
        else:
            params = jax.device_put(given_params, shardings.params)
        state = jax.jit(lambda p: init_state(p, optimizer, seed), out_shardings=shardings)(params)
        return state, shardings

    def abstract_state(self, optimizer, seed: int, model_config) -> tuple[TrainState, TrainState]:
        """(ShapeDtypeStructs of the state, its shardings), nothing materialised: for restoring and planning."""
        abstract_params = jax.eval_shape(lambda: model.init_params(model_config, jax.random.key(seed)))
        abstract = jax.eval_shape(lambda p: init_state(p, optimizer, seed), abstract_params)
        shardings = self.state_shardings(abstract, optimizer, model_config)
        placed = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)
        return placed, shardings

    def train_step(self, shardings: TrainState, donate: bool = True, **step_kwargs):
        """The step compiled for this layout; the state is donated (updated in place) unless `donate=False`."""
        donated = (0,) if donate else ()
        if self.mode != "mesh":
            return parallel.wrap(functools.partial(train_step, **step_kwargs), self.mode, self.mesh,
                                 ("rep", "data"), ("rep", "rep"), donate_argnums=donated)
        batch = sharding.batch_sharding(self.mesh)
        return parallel.wrap_global(functools.partial(train_step, axis=None, **step_kwargs), self.mesh,
                                    (shardings, batch), (shardings, sharding.replicated(self.mesh)), donated)

    def eval_step(self, param_shardings, model_config):
        if self.mode != "mesh":
            return parallel.wrap(functools.partial(eval_step, model_config=model_config), self.mode, self.mesh,
                                 ("rep", "data"), "rep")
        return parallel.wrap_global(functools.partial(eval_step, model_config=model_config, axis=None), self.mesh,
                                    (param_shardings, sharding.batch_sharding(self.mesh)),
                                    sharding.replicated(self.mesh))


def memory_plan(compiled, abstract_state: TrainState) -> dict:
    """Per-device bytes of the parameters and optimizer state as stored (`abstract_state` carries shardings), and
    what XLA planned for the compiled step."""
    return {"params_bytes": sharding.bytes_per_device(abstract_state.params),
            "optimizer_bytes": sharding.bytes_per_device(abstract_state.opt_state),
            **{f"step_{k}_bytes": v for k, v in sharding.memory_report(compiled).items()}}


def plan(model_config, train_config, optimizer) -> dict:
    """Compiles the train step for `train_config`'s mesh with abstract inputs (nothing materialised: it works for
    models and meshes far larger than this machine, e.g. 64 simulated devices) and reports per-device memory.
    The step is planned in the global-view (mesh) layout, which is what a data-only mesh compiles to as well."""
    layout = Layout.resolve(dataclasses.replace(train_config, parallel="mesh"), model_config)
    abstract, shardings = layout.abstract_state(optimizer, train_config.seed, model_config)
    B, T = train_config.batch_size, train_config.seq_len
    split = sharding.batch_sharding(layout.mesh)
    batch = {"tokens": jax.ShapeDtypeStruct((B, T + 1), jnp.int32, sharding=split),
             "loss_mask": jax.ShapeDtypeStruct((B, T), jnp.float32, sharding=split),
             "stop": jax.ShapeDtypeStruct((B,), jnp.int32, sharding=split)}
    step = layout.train_step(shardings, model_config=model_config, train_config=train_config, optimizer=optimizer)
    compiled = step.lower(abstract, batch).compile()
    return {"mesh": str(layout.shape), "devices": layout.shape.size, **memory_plan(compiled, abstract)}
