"""Per-device memory of decoding on a mesh, from the compiled programs, with nothing materialised.

    memory_report(config, "data=2,tensor=4", batch=8, prompt_len=512, new_tokens=256)

compiles the Generator's prefill and decode-loop programs for `jax.ShapeDtypeStruct` params and inputs that carry
their shardings (decode/mesh.py), so it plans models far larger than this machine, and meshes it does not have
(simulated devices: XLA_FLAGS=--xla_force_host_platform_device_count=64). Shapes are the buckets the Generator
would run (decode/config.py): prompt length and new tokens to powers of two, the batch to a multiple of data×fsdp.
The figures are XLA's for the backend it compiles for. Parameter, cache and argument bytes are the same arithmetic
on any backend; temporaries follow the backend's fusions, and a CPU compile's bf16 temporaries include fp32
copies of the weights (the CPU backend upcasts bf16 matmuls), which a GPU does not make.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from aigc_jax import model, sharding
from aigc_jax.decode import mesh as decode_mesh
from aigc_jax.decode.config import GenerationConfig, Strategy, batch_bucket, bucket
from aigc_jax.decode.program import Program
from aigc_jax.decode.sampling import make_knobs
from aigc_jax.decode.step import decoding_config


def _abstract(shapes, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _figures(compiled) -> dict:
    return {f"{k}_bytes": v for k, v in sharding.memory_report(compiled).items()}


def memory_report(config, mesh, batch: int, prompt_len: int, new_tokens: int, num_beams: int = 1) -> dict:
    """Per-device bytes of decoding `batch` prompts of `prompt_len` tokens for `new_tokens` tokens (greedy, or beam
    search with `num_beams`) on `mesh` (a Mesh, MeshShape or "data=D,fsdp=F,tensor=T"): parameters and KV cache
    as placed, and `compiled.memory_analysis()` of the prefill and of the decode loop."""
    mesh = decode_mesh.resolve(mesh)
    cfg = decoding_config(config)
    decode_mesh.check_model(cfg, mesh)
    gen = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, num_beams=num_beams, eos_ids=(), seed=0)
    gen.check(cfg.n_positions, cfg.vocab_size, [prompt_len])
    P, N = bucket(prompt_len, cfg.n_positions), bucket(new_tokens, cfg.n_positions)
    rows = batch_bucket(batch, decode_mesh.row_split(mesh))

    shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    param_shardings = decode_mesh.param_shardings(cfg, shapes, mesh)
    params = _abstract(shapes, param_shardings)
    program = Program(cfg, Strategy.of(gen), N)
    fns = decode_mesh.jit_programs(program.calls(packed=False), program.search.state, mesh, param_shardings)
    rows_sharding = sharding.batch_sharding(mesh)
    prompts = (jax.ShapeDtypeStruct((rows, P), jnp.int32, sharding=rows_sharding),
               jax.ShapeDtypeStruct((rows, P), jnp.bool_, sharding=rows_sharding),
               jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=rows_sharding))
    knobs = make_knobs(gen, N)  # a few scalars: real values are fine

    prefill = fns["prefill"].lower(params, *prompts, knobs).compile()
    state = _abstract(jax.eval_shape(fns["prefill"], params, *prompts, knobs),
                      decode_mesh.state_shardings(program.search.state, mesh))
    loop = fns["run"].lower(params, state, knobs, jnp.int32(N)).compile()
    total = lambda tree: sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))
    return {
        "mesh": dataclasses.asdict(sharding.mesh_shape(mesh)),
        "devices": mesh.size,
        "batch": rows, "prompt_len": P, "new_tokens": N, "num_beams": num_beams, "cache_slots": P + N,
        "dtype": cfg.dtype,
        "params": model.count_params(shapes, cfg),
        "param_bytes": total(shapes),
        "param_bytes_per_device": sharding.bytes_per_device(params),
        "kv_cache_bytes": total(state.cache),
        "kv_cache_bytes_per_device": sharding.bytes_per_device(state.cache),
        "prefill": _figures(prefill),
        "decode": _figures(loop),
    }
