"""Our training speed: the training loop's own step (aigc_jax.train.step.train_step, wrapped by parallel.wrap with
the state donated, exactly as aigc_jax/train/loop.py does) on one device and a fixed synthetic batch.

Measured: compile time (lower + compile, ahead of time), step time (median over windows of back-to-back steps,
each window ending in a device sync, so dispatch overlaps as in the loop), tokens/s, MFU against the matmul peak
measured in the same run and against the datasheet peak, XLA's own FLOP count, and memory (the compiled
executable's arguments + temporaries + outputs - aliased, and the process's device peak where the backend
reports one).
"""

from __future__ import annotations

import functools
import math
import time

from benchmarks import common


def measure(cfg, batch: int, seq_len: int, *, mode: str = "pmap", donate: bool = True, warmup: int = 2,
            windows: int = 5, steps_per_window: int = 3, peak_flops: float | None = None, seed: int = 0) -> dict:
    """Times `train_step` for model config `cfg` on a [batch, seq_len] batch. Returns a flat dict of results."""
    import jax
    import numpy as np

    from aigc_jax import parallel
    from aigc_jax.model import init_params
    from aigc_jax.train import optimizer as optim
    from aigc_jax.train.config import TrainConfig
    from aigc_jax.train.metrics import peak_flops_per_device
    from aigc_jax.train.step import init_state, train_step

    tcfg = TrainConfig(batch_size=batch, seq_len=seq_len, steps=100_000, warmup_steps=10, parallel=mode,
                       progress=False)
    optimizer = optim.make(tcfg)
    mesh = parallel.make_mesh(jax.devices()[:1])
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = jax.jit(lambda: init_state(init_params(cfg, jax.random.key(seed)), optimizer, seed),
                    out_shardings=replicated)()
    rows = {"tokens": common.synthetic_tokens(batch, seq_len + 1, cfg.vocab_size, seed),
            "loss_mask": np.ones((batch, seq_len), np.float32)}
    batch_dev = parallel.shard_batch(rows, mode, mesh)
    step_fn = parallel.wrap(
        functools.partial(train_step, model_config=cfg, train_config=tcfg, optimizer=optimizer),
        mode, mesh, ("rep", "data"), ("rep", "rep"), donate_argnums=(0,) if donate else (),
    )

    start = time.perf_counter()
    compiled = step_fn.lower(state, batch_dev).compile()
    compile_s = time.perf_counter() - start

    metrics = None

    def run(n: int):
        nonlocal state, metrics
        for _ in range(n):
            state, metrics = compiled(state, batch_dev)
        jax.block_until_ready((state, metrics))

    start = time.perf_counter()
    run(1)
    first_step_s = time.perf_counter() - start
    run(warmup)
    step = common.spread(common.timed(lambda: run(steps_per_window), windows), per=steps_per_window)
    loss = float(jax.device_get(metrics["loss"]))
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss} in the timed steps")

    tokens_per_s = batch * seq_len / step["median"]
    flops_tok = common.flops_per_token(cfg, seq_len)
    datasheet = peak_flops_per_device()
    mem = compiled.memory_analysis()
    xla_flops = _xla_flops(compiled)
    return {
        "step_ms": 1000 * step["median"],
        "step_ms_min": 1000 * step["min"],
        "step_ms_max": 1000 * step["max"],
        "tokens_per_s": tokens_per_s,
        "compile_s": compile_s,
        "first_step_s": first_step_s,
        "flops_per_token": flops_tok,
        "xla_flops_per_token": xla_flops / (batch * seq_len) if xla_flops else None,
        "achieved_tflops": tokens_per_s * flops_tok / 1e12,
        "mfu": tokens_per_s * flops_tok / peak_flops if peak_flops else None,
        "mfu_datasheet": tokens_per_s * flops_tok / datasheet if datasheet else None,
        "compiled_bytes": (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                           - mem.alias_size_in_bytes) if mem is not None else None,
        "process_peak_bytes": common.jax_memory_peak(),
        "params": common.param_count(cfg),
        "loss": loss,
        "parallel": mode,
        "donate": donate,
        **common.jax_device_info(),
    }


def _xla_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend/version implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None
