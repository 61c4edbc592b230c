"""The CPU set (`make bench-cpu`, < 15 minutes on 2 cores): ours vs HF transformers in PyTorch, fp32, same run.

    python benchmarks/run_cpu.py [--out DIR] [--sections main,data,levers] [--quick] [--list]

main:   `baby` (6 layers, d=384, vocab 257) training B8×T256, ours vs HF eager (target ≥ 1.2×);
        decoding prompt 16 + 256 new tokens at batch 1, ours vs HF generate with the dynamic cache and with
        the static cache (target ≥ 3× faster). For decoding, n_positions is raised to 1024 on both sides
        (the baby's 256-token context cannot hold 16 + 256); it changes no compute. The same train and decode
        cases for `llama-baby` (6 layers, d=384, 6 heads / 2 KV heads, SwiGLU 1024) vs HF's LlamaForCausalLM.
data:   the input pipeline (benchmarks/data_throughput.py) on the embedded default corpus.
levers: ours with scan_layers, remat=dots, unpadded vocab, donation off, shard_map (decoding always runs unrolled layers).
mesh:   (optional: `--sections mesh`) 8 simulated CPU devices in one process: `baby` training B16×T256 on
        data=8 (pmap, the default layout) vs data=2,fsdp=2,tensor=2 and fsdp=8 (global-view jit). Informative only:
        the 8 "devices" share 2 cores, so collectives cost memory copies, not network time, and nothing here
        predicts a GPU's scaling; it shows the sharded step runs and what its overhead is on a CPU.
flags:  (optional: `--sections flags`) XLA CPU flags, one process each, train + decode batch 1.

Writes benchmarks/results/cpu-<time>/{results.jsonl, log.txt, report.md, *.png}; prints the report last.
Timings on a shared machine are noisy: run it when `uptime` shows a 1-minute load average below ~0.5.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.suite import Group, case, data_group, flag_groups, main

# XLA CPU flags worth trying (defaults in jaxlib 0.10: concurrency-optimized scheduler, 256-bit vectors, XNNPACK on,
# YNNPACK for single dots).
XLA_FLAG_VARIANTS = {
    "xla: concurrency scheduler off": "--xla_cpu_enable_concurrency_optimized_scheduler=false",
    "xla: 512-bit vectors": "--xla_cpu_prefer_vector_width=512",
    "xla: no xnnpack": "--xla_cpu_use_xnnpack=false",
    "xla: no ynn dots": "--xla_cpu_experimental_ynn_fusion_type=",
    "xla: onednn": "--xla_cpu_use_onednn=true",
    "xla: single-threaded eigen": "--xla_cpu_multi_thread_eigen=false",
}


def build(quick: bool = False) -> list[Group]:
    preset, llama = ("tiny", "llama-tiny") if quick else ("baby", "llama-baby")
    train = dict(preset=preset, dtype="float32", batch=2 if quick else 8, seq_len=32 if quick else 256,
                 opts={"windows": 2, "steps_per_window": 1} if quick else {"windows": 5, "steps_per_window": 2})
    decode = dict(preset=preset, dtype="float32", model={"n_positions": 1024}, batch=1, prompt_len=16,
                  new_tokens=16 if quick else 256)
    ours_decode = {**decode, "opts": {"repeats": 2 if quick else 5}}
    peer_decode = {**decode, "opts": {"repeats": 2 if quick else 3}}
    n = 256 if quick else 1024

    def lever(bench, label, **changes):
        base = train if bench == "train" else ours_decode
        return case(bench, "ours", **{**base, "label": label, "model": {**base.get("model", {}), **changes.pop("model", {})},
                                      "opts": {**base["opts"], **changes.pop("opts", {})}, **changes})

    return [
        Group("ours", "main", 300, [
            case("peak", "jax", dtype="float32", opts={"n": n, "inner": 3}),
            case("bandwidth", "jax", opts={"megabytes": 64 if quick else 256, "inner": 3}),
            case("train", "ours", **train),
            case("decode", "ours", **ours_decode),
        ]),
        Group("peer", "main", 300, [
            case("peak", "torch", dtype="float32", opts={"n": n, "inner": 3}),
            case("train", "hf_eager", **train),
            case("decode", "hf_dynamic", **peer_decode),
            case("decode", "hf_static_eager", **peer_decode),
        ]),
        # The Llama family: llama-baby (the baby's size, SwiGLU, 2 KV heads) against transformers' LlamaForCausalLM.
        Group("ours-llama", "main", 150, [
            case("train", "ours", **{**train, "preset": llama}),
            case("decode", "ours", **{**ours_decode, "preset": llama}),
        ]),
        Group("peer-llama", "main", 150, [
            case("train", "hf_eager", **{**train, "preset": llama}),
            case("decode", "hf_dynamic", **{**peer_decode, "preset": llama}),
        ]),
        data_group(60, "--seconds", "0.5" if quick else "1",
                   "--shapes", "8x256,64x256" if quick else "8x256,64x256,16x1024,64x1024"),
        Group("ours-levers", "levers", 240, [
            lever("train", "scan_layers", model={"scan_layers": True}),
            lever("train", "vocab unpadded", model={"vocab_multiple": 1}),
            lever("train", "remat dots", model={"remat": "dots"}),
            lever("train", "no donation", opts={"donate": False}),
            lever("train", "shard_map", opts={"mode": "shard_map"}),
        ]),
        Group("ours-mesh", "mesh", 240, [
            case("train", "ours", **{**train, "batch": 16 if not quick else 8, "label": label,
                                     "opts": {**train["opts"], "mode": mode, "mesh": mesh}})
            for label, mode, mesh in (("baseline", "pmap", "data=8"), ("mesh 2,2,2", "mesh", "data=2,fsdp=2,tensor=2"),
                                      ("mesh fsdp=8", "mesh", "fsdp=8"))],
              xla_flags="--xla_force_host_platform_device_count=8", optional=True),
        *flag_groups(XLA_FLAG_VARIANTS, lambda label: [lever("train", label), lever("decode", label)], 90,
                     optional=True, baseline=True),
    ]


if __name__ == "__main__":
    main("cpu", build, title="CPU set (make bench-cpu)", targets="cpu", total_budget_s=870, grace_s=30,
         env={"JAX_PLATFORMS": "cpu"}, doc=__doc__)
