"""Speed benchmarks for aigc_jax against HF transformers GPT-2 in PyTorch. Not imported by the package.

    common.py        timing, environment, model shapes, FLOP/byte counts, matmul and copy ceilings
    train_speed.py   ours: one optimizer step (the training loop's wrapped train_step)
    decode_speed.py  ours: prefill + on-device greedy decode (aigc_jax.decode.Generator)
    peer_torch.py    HF GPT2LMHeadModel: train step (eager / torch.compile) and generate (dynamic / static cache)
    data_throughput.py  host input pipeline
    bench.py         worker: runs a list of cases in one process, one JSON line each
    suite.py         driver: runs groups of cases in worker processes under time budgets, writes raw JSON lines
    run_cpu.py       `make bench-cpu`: the CPU set
    run_gpu.py       the GPU set (one command, < 8 minutes on an H200)
    report.py        JSON lines -> markdown table with our/peer ratios + PNG plots
    profile_ops.py   one of our cases under jax.profiler: time per XLA op / GPU kernel
"""
