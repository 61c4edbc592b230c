"""`aigc-jax info`: what a model is (config, parameters, FLOPs per token) and what it will cost per device.

    aigc-jax info --model gpt2-xl --set dtype=bfloat16 --mesh fsdp=8 --batch-size 8 --seq-len 1024

With --mesh or --batch-size it compiles the train step for that mesh with abstract inputs: nothing is
materialised, so it plans models and meshes far larger than this machine (simulate devices with
XLA_FLAGS=--xla_force_host_platform_device_count=64). It prints one JSON object: parameter count, per-device bytes
of parameters and optimizer state as stored, and the compiled step's per-device argument / output / aliased /
temporary bytes (`compiled.memory_analysis()`) with the peak they imply; then the same for decoding
(`decode`: prefill and decode-loop programs, weights over tensor, KV cache over rows and heads). What those figures mean for a GPU is in
README ("Memory you can plan with").
"""

from __future__ import annotations

import json

from aigc_jax import configs
from aigc_jax.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("info", help="a model's config, size and FLOPs; with --mesh/--batch-size its per-device memory")
    configs.add_model_args(p)
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (default: n_positions)")
    p.add_argument("--mesh", default=None, metavar="data=D,fsdp=F,tensor=T",
                   help="plan the train step on this mesh (default: every device on data)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch for the memory plan (default: devices)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step for the memory plan")
    p.add_argument("--new-tokens", type=int, default=None,
                   help="tokens generated per prompt in the decode plan (default: seq-len / 2; prompts fill the rest)")
    p.add_argument("--no-decode", action="store_true", help="skip the decode plan (it compiles two more programs)")
    p.add_argument("--forward", action="store_true", help="initialise random weights and run one forward pass")
    p.set_defaults(func=run)


def run(args) -> int:
    import jax
    import jax.numpy as jnp

    from aigc_jax import model
    from aigc_jax.decode import plan as decode_plan
    from aigc_jax.train import layout, optimizer
    from aigc_jax.commands.train import split_overrides
    from aigc_jax.train.config import TrainConfig

    model_over, train_over = split_overrides(args.set)
    cfg = configs.model_config(args.model, args.config, model_over)
    seq_len = cfg.n_positions if args.seq_len is None else args.seq_len
    if not 1 <= seq_len <= cfg.n_positions:
        raise UserError(f"--seq-len must be in [1, n_positions={cfg.n_positions}], got {seq_len}")
    out = {
        "config": cfg.to_dict(),
        "params": model.param_count(cfg),
        "flops_per_token": model.flops_per_token(cfg, seq_len),
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
    }
    if args.mesh is not None or args.batch_size is not None or train_over:
        batch = args.batch_size if args.batch_size is not None else jax.device_count() * args.grad_accum
        if batch < 1 or args.grad_accum < 1:
            raise UserError("--batch-size and --grad-accum must be >= 1")
        tc = TrainConfig.from_dict({**train_over, "batch_size": batch, "seq_len": seq_len,
                                    "grad_accum": args.grad_accum, "mesh": args.mesh or ""})
        new = seq_len // 2 if args.new_tokens is None else args.new_tokens
        if args.new_tokens is not None and not 1 <= new < seq_len:
            raise UserError(f"--new-tokens must be in [1, seq-len={seq_len}), got {new}")
        out["train"] = _train_section(layout.plan(cfg, tc, optimizer.make(tc)), batch, seq_len, args.grad_accum)
        if not args.no_decode and new >= 1:
            # Decoding shards weights over tensor only (DECODE_RULES) and rows over data x fsdp: same mesh, other plan.
            out["decode"] = _decode_section(decode_plan.memory_report(
                cfg, args.mesh or f"data={jax.device_count()}", batch=batch // args.grad_accum,
                prompt_len=seq_len - new, new_tokens=new))
    if args.forward:
        params = model.init_params(cfg, jax.random.key(0))
        tokens = jax.random.randint(jax.random.key(1), (2, seq_len), 0, cfg.vocab_size)
        logits, _ = jax.jit(lambda p, t: model.forward(p, t, cfg))(params, tokens)
        out["forward"] = {"logits_shape": list(logits.shape), "logits_dtype": str(logits.dtype),
                          "mean_loss_vs_uniform": float(-jnp.mean(jax.nn.log_softmax(logits)[..., : cfg.vocab_size]))}
    print(json.dumps(with_human_sizes(out), indent=2))
    return 0


# Both plans say the same things the same way: the mesh as "data=D,fsdp=F,tensor=T", rows as batch_size, bytes
# that one device holds as *_bytes_per_device, and each compiled program's figures under its own name.


def _train_section(plan: dict, batch: int, seq_len: int, grad_accum: int) -> dict:
    return {"mesh": plan["mesh"], "devices": plan["devices"], "batch_size": batch, "seq_len": seq_len,
            "grad_accum": grad_accum, "params_bytes_per_device": plan["params_bytes"],
            "optimizer_bytes_per_device": plan["optimizer_bytes"],
            "step": {k[len("step_"):]: v for k, v in plan.items() if k.startswith("step_")}}


def _decode_section(report: dict) -> dict:
    renamed = {"batch": "batch_size", "param_bytes": "params_bytes", "param_bytes_per_device": "params_bytes_per_device"}
    out = {renamed.get(k, k): v for k, v in report.items()}
    out["mesh"] = ",".join(f"{axis}={size}" for axis, size in report["mesh"].items())
    return out


def with_human_sizes(tree):
    """Beside every byte count ("…_bytes…": int) the same size for a person: "…_bytes…_human": "1.50 GiB"."""
    from aigc_jax.sharding import human_bytes

    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        out[key] = with_human_sizes(value)
        if "bytes" in key and isinstance(value, int):
            out[f"{key}_human"] = human_bytes(value)
    return out
