"""The GPU set: one command, < 8 minutes, ours vs HF transformers in PyTorch on the same GPU (sized for an H200).

Needs a machine with an NVIDIA GPU, JAX with CUDA, and torch + transformers (the test extras) in the same Python:

    PYTHONPATH=. python3 benchmarks/run_gpu.py --out DIR              # everything, main table first
    PYTHONPATH=. python3 benchmarks/run_gpu.py --sections levers,flags --budget 240 --out DIR
    PYTHONPATH=. python3 benchmarks/run_gpu.py --sections llama --budget 360 --out DIR    # Llama-3.2-1B shape
    python3 benchmarks/run_gpu.py --list                               # what would run

Sections, in order (each group has its own time budget; a group that cannot start in the total budget, or cases
its worker did not reach, are recorded as skipped, saying so):
  main     ceilings (bf16 matmul peak, copy bandwidth); GPT-2 124M train B16×T1024 ours vs HF eager vs HF
           torch.compile; decode prompt 16 + 256 new at batch 1 and 64, ours vs HF dynamic cache vs HF static cache
           (compiled by HF: CUDA graphs); GPT-2 XL B8×T1024 MFU ours (scanned layers: compiles in a fraction of the
           unrolled time) vs HF with per-block torch.compile.
  sweep    ours decode at batch 8 and 256.
  levers   ours, one variant at a time against the main baseline: attention xla (vs cuDNN), unpadded vocab,
           scan_layers, remat=dots, no donation, shard_map; decode with fp32 weights.
  flags    XLA GPU flags, each in its own process (XLA_FLAGS is read once at start): train 124M + decode batch 1.
  data     the host input pipeline on synthetic tokens.
  llama    (optional: `--sections llama`) a Llama-3.2-1B-shaped model (random weights, bf16): train B8×T1024 ours
           vs HF eager vs HF torch.compile; decode prompt 16 + 256 new at batch 1 and 64, ours vs HF dynamic /
           static cache.
  sharded  (optional, `--sections sharded`) the (data, fsdp, tensor) layout at fsdp=1 on one device: step time
           next to the data layout (124M, XL), the planner's per-device memory vs the process's peak (XL) and
           the plan for Llama-3-8B at fsdp=1 (then its run, expected to run out of memory).
  serve    (optional, `--sections serve`) GPT-2 124M behind `aigc-jax serve` vs `transformers serve
           --continuous-batching`: output tokens/s, TTFT and inter-token latency at concurrency 1, 8, 32.

Output under --out (default: $OUT if that environment variable is set, else benchmarks/results/gpu-<time>):
results.jsonl (raw), log.txt (worker stderr), report.md, train.png, decode.png, levers.png. The last thing printed
is the short table (targets, training, decoding).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.suite import Group, case, data_group, flag_groups, main, serve_group

XLA_FLAG_VARIANTS = {
    "xla: latency-hiding scheduler": "--xla_gpu_enable_latency_hiding_scheduler=true",
    "xla: no triton gemm": "--xla_gpu_enable_triton_gemm=false",
    "xla: command buffers off": "--xla_gpu_enable_command_buffer=",
    "xla: command buffers + while/conditional":
        "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL",
}


def build(quick: bool = False) -> list[Group]:
    small = "tiny" if quick else None
    bf16 = dict(dtype="bfloat16")
    train = dict(preset=small or "gpt2", **bf16, batch=2 if quick else 16, seq_len=32 if quick else 1024,
                 opts={"warmup": 3, "windows": 5, "steps_per_window": 5})
    train_xl = dict(preset=small or "gpt2-xl", **bf16, batch=4 if quick else 8, seq_len=32 if quick else 1024,
                    model={"scan_layers": True}, opts={"warmup": 1, "windows": 3, "steps_per_window": 3})
    decode = dict(preset=small or "gpt2", **bf16, prompt_len=16, new_tokens=16 if quick else 256)

    def dec(impl, batch, label="baseline", **kw):
        return case("decode", impl, **{**decode, "batch": batch, "label": label,
                                        "opts": {"repeats": 5 if impl == "ours" else 3, **kw.pop("opts", {})}, **kw})

    def lever(label, **changes):
        return case("train", "ours", **{**train, "label": label, "model": changes.pop("model", {}),
                                        "opts": {**train["opts"], **changes.pop("opts", {})}})

    n, megabytes = (1024, 64) if quick else (8192, 2048)
    groups = [
        Group("ours", "main", 180, [
            case("peak", "jax", **bf16, opts={"n": n}),
            case("bandwidth", "jax", opts={"megabytes": megabytes}),
            case("train", "ours", **train),
            dec("ours", 1),
            dec("ours", 64),
            case("train", "ours", **train_xl),
        ]),
        Group("peer", "main", 200, [
            case("peak", "torch", **bf16, opts={"n": n}),
            case("train", "hf_eager", **train),
            case("train", "hf_compile", **train),
            dec("hf_dynamic", 1),
            dec("hf_dynamic", 64),
            dec("hf_static", 1),
            dec("hf_static", 64),
        ]),
        Group("peer-xl", "main", 100, [case("train", "hf_compile_regional", **train_xl)]),
        Group("ours-sweep", "sweep", 60, [dec("ours", 8), dec("ours", 256)]),
        Group("ours-levers", "levers", 180, [
            lever("attention xla", model={"attention": "xla"}),
            dec("ours", 1, "fp32 weights", opts={"cast_params": False}),
            lever("vocab unpadded", model={"vocab_multiple": 1}),
            lever("scan_layers", model={"scan_layers": True}),
            lever("remat dots", model={"remat": "dots"}),
            lever("no donation", opts={"donate": False}),
            lever("shard_map", opts={"mode": "shard_map"}),
        ]),
    ]
    # The Llama family at Llama-3.2-1B's shape (random weights): GQA 32/8 heads, vocab 128256, tied head.
    llama = "llama-tiny" if quick else "llama-3.2-1b"
    train_llama = {**train, "preset": llama, "batch": 2 if quick else 8}
    groups += [
        Group("ours-llama", "llama", 150, [case("train", "ours", **train_llama), dec("ours", 1, preset=llama),
                                           dec("ours", 64, preset=llama)], optional=True),
        Group("peer-llama", "llama", 200, [case("train", "hf_eager", **train_llama),
                                           case("train", "hf_compile", **train_llama),
                                           dec("hf_dynamic", 1, preset=llama), dec("hf_static", 1, preset=llama),
                                           dec("hf_static", 64, preset=llama)], optional=True),
    ]
    # Sharded steps on one H200 (optional: `--sections sharded`): one device cannot show FSDP speed, so this records
    # (a) the mesh layout's step time at fsdp=1 next to the default data layout's (the levers table, same run: they
    # should agree within ~3%) and (b) per-device memory: the planner's prediction vs the process's device peak, for
    # GPT-2 XL and the largest preset (Llama-3-8B: its plan says whether it fits one device at all; the run that
    # follows is expected to run out of memory at fsdp=1, and its error is recorded).
    big = "llama-tiny" if quick else "llama-3-8b"
    big_shape = dict(preset=big, **bf16, batch=1 if quick else 2, seq_len=32 if quick else 1024,
                     model={"scan_layers": True, "remat": "full"}, opts={"warmup": 1, "windows": 2, "steps_per_window": 2})
    mesh1 = {"mode": "mesh"}
    groups.append(Group("ours-sharded", "sharded", 240, [
        lever("mesh fsdp=1", opts=mesh1),
        case("train", "ours", **{**train_xl, "label": "mesh fsdp=1", "opts": {**train_xl["opts"], **mesh1}}),
        case("plan", "ours", **{k: v for k, v in train_xl.items() if k != "opts"}, opts={"mesh": "fsdp=1"}),
        case("plan", "ours", **{k: v for k, v in big_shape.items() if k != "opts"}, opts={"mesh": "fsdp=1"}),
        case("train", "ours", **{**big_shape, "label": "mesh fsdp=1", "opts": {**big_shape["opts"], **mesh1}}),
    ], optional=True))
    groups += flag_groups(XLA_FLAG_VARIANTS, lambda label: [lever(label), dec("ours", 1, label)], 60)
    groups.append(data_group(30, "--synthetic", "100000000", "--seconds", "1", "--shapes", "16x1024,64x1024,256x1024"))
    # Serving GPT-2 124M, ours vs `transformers serve --continuous-batching` (optional: `--sections serve`).
    serve_args = ("--quick",) if quick else ("--preset", "gpt2", "--concurrency", "1,8,32", "--new-tokens", "128")
    groups.append(dataclasses.replace(serve_group(330, *serve_args), optional=True))
    return groups


if __name__ == "__main__":
    out = os.environ.get("OUT")
    main("gpu", build, title="GPU set", targets="gpu", total_budget_s=450, grace_s=30, doc=__doc__,
         default_out=Path(out) if out else None)
