"""The peer: HF transformers `GPT2LMHeadModel` (or `LlamaForCausalLM`, …, for the Llama family) in PyTorch, same
shapes as ours, random weights and tokens.

Training step (what nanoGPT-style PyTorch training does): forward with labels (HF's shifted cross-entropy) under
bf16 autocast when the model's compute dtype is bf16 (fp32 params, like ours), SDPA attention, backward,
global-norm clipping at 1.0, AdamW (fused on CUDA; foreach on CPU) with weight decay on matrices only, zero_grad.
Variants: eager, `torch.compile(model)` ("full") and per-block compilation ("regional": each GPT2Block compiled,
which PyTorch reuses across identical blocks; compiles far faster for deep models, the LM head and loss stay eager).

Generation: `model.generate` greedy, EOS disabled, with the default dynamic cache and with
`cache_implementation="static"`; on CUDA HF compiles the static-cache forward automatically (mode
"reduce-overhead", i.e. CUDA graphs) unless `disable_compile`. The model runs in the compute dtype (bf16 on GPU).
ms/token uses the same definition as decode_speed.py.
"""

from __future__ import annotations

import contextlib
import time

from benchmarks import common

def _torch():
    import torch

    return torch


def device() -> str:
    return "cuda" if _torch().cuda.is_available() else "cpu"


def sync(_=None) -> None:
    torch = _torch()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(cfg, dev: str, seed: int = 0):
    """HF's model of `cfg`'s family and shapes (GPT2LMHeadModel, or LlamaForCausalLM / Qwen2 / Mistral as
    cfg.hf_model_type says; unpadded vocabulary: HF's own), SDPA attention, fp32 weights, on `dev`."""
    import transformers

    from aigc_jax.models import registry

    torch = _torch()
    # The config.json our converter writes for this family (what `convert --to-hf` exports), so the peer is the HF
    # model our weights load into; no tokenizer: no special token ids.
    conversion = registry.for_config(cfg).hf
    hf_config = transformers.AutoConfig.for_model(**{**conversion.export_config(cfg, None, "float32"),
                                                     "pad_token_id": 0})
    cls = getattr(transformers, conversion.architecture(cfg))
    torch.manual_seed(seed)
    with torch.device(dev):
        return cls._from_config(hf_config, attn_implementation="sdpa")


def _memory_reset() -> None:
    torch = _torch()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _memory_peak() -> int | None:
    torch = _torch()
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def _info(dev: str) -> dict:
    torch = _torch()
    kind = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    return {"backend": "gpu" if dev == "cuda" else "cpu", "device_kind": kind, "torch_threads": torch.get_num_threads()}


def train(cfg, batch: int, seq_len: int, *, compile: str | None = None, warmup: int = 2, windows: int = 5,
          steps_per_window: int = 3, peak_flops: float | None = None, seed: int = 0) -> dict:
    """Times HF's train step. compile: None (eager), "full" (torch.compile(model)) or "regional" (per block)."""
    torch = _torch()
    dev = device()
    torch.set_float32_matmul_precision("high")
    _memory_reset()
    model = build(cfg, dev, seed).train()
    params = list(model.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=dev == "cuda")
    torch._dynamo.reset()  # every case compiles from scratch: its compile time is its own
    forward = model
    if compile == "full":
        forward = torch.compile(model)
    elif compile == "regional":
        base = model.base_model  # the decoder stack: `layers` (Llama, Qwen2, Mistral) or `h` (GPT-2)
        for block in getattr(base, "layers", None) or base.h:
            block.compile()
    elif compile is not None:
        raise ValueError(f"compile must be None, 'full' or 'regional', got {compile!r}")
    amp = (torch.autocast(dev, dtype=getattr(torch, cfg.dtype)) if cfg.dtype != "float32"
           else contextlib.nullcontext())
    tokens = torch.from_numpy(common.synthetic_tokens(batch, seq_len, cfg.vocab_size, seed)).long().to(dev)
    losses = []

    def run(n: int):
        loss = None
        for _ in range(n):
            with amp:
                loss = forward(input_ids=tokens, labels=tokens).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if loss is not None:
            losses.append(loss.detach())
        sync()

    start = time.perf_counter()
    run(1)
    first_step_s = time.perf_counter() - start
    run(warmup)
    step = common.spread(common.timed(lambda: run(steps_per_window), windows), per=steps_per_window)
    tokens_per_s = batch * seq_len / step["median"]
    flops_tok = common.flops_per_token(cfg, seq_len)
    return {
        "step_ms": 1000 * step["median"],
        "step_ms_min": 1000 * step["min"],
        "step_ms_max": 1000 * step["max"],
        "tokens_per_s": tokens_per_s,
        "compile_s": max(first_step_s - step["median"], 0.0) if compile else None,
        "first_step_s": first_step_s,
        "flops_per_token": flops_tok,
        "achieved_tflops": tokens_per_s * flops_tok / 1e12,
        "mfu": tokens_per_s * flops_tok / peak_flops if peak_flops else None,
        "peak_bytes": _memory_peak(),
        "params": sum(p.numel() for p in params),
        "loss": float(losses[-1]),
        "compile": compile or "eager",
        **_info(dev),
    }


def generate(cfg, batch: int, prompt_len: int, new_tokens: int, *, cache: str = "dynamic", compile: bool = True,
             repeats: int = 3, peak_bw: float | None = None, seed: int = 0) -> dict:
    """Times greedy `generate`. cache: "dynamic" or "static"; compile: let HF compile the static-cache forward
    (it only does so on CUDA)."""
    torch = _torch()
    dev = device()
    _memory_reset()
    model = build(cfg, dev, seed).to(getattr(torch, cfg.dtype)).eval()
    ids = torch.from_numpy(common.synthetic_tokens(batch, prompt_len, cfg.vocab_size, seed)).long().to(dev)
    kwargs = {"attention_mask": torch.ones_like(ids), "do_sample": False, "pad_token_id": 0}
    if cache == "static":
        kwargs.update(cache_implementation="static", disable_compile=not compile)
        torch._dynamo.reset()  # a fresh compile per batch size: no dynamic-shape recompile from the previous case
    elif cache != "dynamic":
        raise ValueError(f"cache must be 'dynamic' or 'static', got {cache!r}")

    def call(n: int):
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, **kwargs)
        sync()
        return out

    # The full-length call first: HF sizes the static cache for the longest call so far, so the prefill-only
    # calls below reuse the same cache shape (no recompilation).
    start = time.perf_counter()
    out = call(new_tokens)
    first_s = time.perf_counter() - start
    if tuple(out.shape) != (batch, prompt_len + new_tokens):
        raise RuntimeError(f"generate returned shape {tuple(out.shape)}, expected {(batch, prompt_len + new_tokens)}")
    timing = common.time_decode(lambda: call(new_tokens), lambda: call(1), repeats, cfg, batch, prompt_len,
                                new_tokens, weight_dtype=cfg.dtype, padded_vocab=False, peak_bw=peak_bw)
    compiled = cache == "static" and compile and dev == "cuda"
    return {
        **timing,
        "compile_s": max(first_s - timing["total_ms"] / 1000, 0.0) if compiled else None,
        "first_call_s": first_s,
        "peak_bytes": _memory_peak(),
        "cache": cache,
        "compiled": compiled,
        **_info(dev),
    }


def matmul_peak(dtype: str, n: int, repeats: int = 5, inner: int = 10) -> dict:
    """FLOP/s of an n×n×n torch matmul in `dtype` (for comparison with JAX's: the same chip, another library)."""
    torch = _torch()
    dev = device()
    gen = torch.Generator(device=dev).manual_seed(1)
    a = torch.randn(n, n, device=dev, generator=gen).to(getattr(torch, dtype))
    b = torch.randn(n, n, device=dev, generator=gen).to(getattr(torch, dtype))
    r = common.rate(lambda: a @ b, sync, 2 * n**3, inner, repeats)
    return {"flops_per_s": r["per_s"], "n": n, "dtype": dtype, "time_s": r["time_s"], **_info(dev)}
