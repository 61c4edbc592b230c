"""Our training speed: the training loop's own step, compiled by its Layout (aigc_jax/train/layout.py) exactly as
aigc_jax/train/loop.py does (state created where it lives, donated), on a fixed synthetic batch. `mode` and `mesh`
are the loop's --parallel and --mesh: the default is every device on data (pmap), `mode="mesh"` the global-view
jit on a (data, fsdp, tensor) mesh, which on one device is the fsdp=1 case of the sharded step.

Measured: compile time (lower + compile, ahead of time), step time (median over windows of back-to-back steps,
each window ending in a device sync, so dispatch overlaps as in the loop), tokens/s, MFU against the matmul peak
measured in the same run and against the datasheet peak, XLA's own FLOP count, and memory (the compiled
executable's arguments + temporaries + outputs - aliased, and the process's device peak where the backend
reports one).
"""

from __future__ import annotations

import math
import time

from benchmarks import common


def measure(cfg, batch: int, seq_len: int, *, mode: str = "pmap", mesh: str = "", donate: bool = True,
            warmup: int = 2, windows: int = 5, steps_per_window: int = 3, peak_flops: float | None = None,
            seed: int = 0) -> dict:
    """Times `train_step` for model config `cfg` on a [batch, seq_len] batch. Returns a flat dict of results."""
    import jax
    import numpy as np

    from aigc_jax.train import optimizer as optim
    from aigc_jax.train.config import TrainConfig
    from aigc_jax.train.layout import Layout, memory_plan
    from aigc_jax.train.metrics import peak_flops_per_device

    tcfg = TrainConfig(batch_size=batch, seq_len=seq_len, steps=100_000, warmup_steps=10, parallel=mode, mesh=mesh,
                       progress=False)
    optimizer = optim.make(tcfg)
    layout = Layout.resolve(tcfg, cfg)
    abstract, _ = layout.abstract_state(optimizer, seed, cfg)
    state, shardings = layout.initial_state(None, optimizer, seed, cfg)
    rows = {"tokens": common.synthetic_tokens(batch, seq_len + 1, cfg.vocab_size, seed),
            "loss_mask": np.ones((batch, seq_len), np.float32)}
    batch_dev = layout.place(rows)
    step_fn = layout.train_step(shardings, donate=donate, model_config=cfg, train_config=tcfg, optimizer=optimizer)

    start = time.perf_counter()
    compiled = step_fn.lower(state, batch_dev).compile()
    compile_s = time.perf_counter() - start
    # What the planner (`aigc-jax info`) reports for this step, before it runs: compare with process_peak_bytes.
    plan = memory_plan(compiled, abstract)

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
        "compiled_bytes": plan.get("step_peak_bytes"),
        "planned": plan,
        "process_peak_bytes": common.jax_memory_peak(),
        "params": common.param_count(cfg),
        "loss": loss,
        "parallel": layout.mode,
        "mesh": str(layout.shape),
        "devices": layout.shape.size,
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


def plan(cfg, batch: int, seq_len: int, *, mesh: str = "", grad_accum: int = 1) -> dict:
    """The planner's per-device memory for the train step (`aigc-jax info`): compiled with abstract inputs, nothing
    materialised, so it answers for models that do not fit. Recorded next to a run's process_peak_bytes."""
    import jax

    from aigc_jax.train import layout
    from aigc_jax.train import optimizer as optim
    from aigc_jax.train.config import TrainConfig

    tcfg = TrainConfig(batch_size=batch, seq_len=seq_len, grad_accum=grad_accum, mesh=mesh, progress=False)
    start = time.perf_counter()
    out = layout.plan(cfg, tcfg, optim.make(tcfg))
    stats = jax.devices()[0].memory_stats() or {}
    return {**out, "compile_s": time.perf_counter() - start, "params": common.param_count(cfg),
            "device_bytes_limit": stats.get("bytes_limit"), **common.jax_device_info()}
