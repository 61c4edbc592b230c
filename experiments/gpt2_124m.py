"""The GPT-2 124M pretraining recipe (nanoGPT / llm.c) on aigc_jax, with a smoke mode for one GPU and for a CPU.

Published:
- llm.c (karpathy/llm.c, discussion #481 and scripts/run_gpt2_124M.sh): 124M on 10B FineWeb tokens, 18,865 steps of
  524,288 tokens (B 64 x T 1024 per GPU, 8 GPUs), lr 6e-4, 700 warmup steps, cosine to 0, weight decay 0.1, β2 0.95:
  FineWeb validation loss ≈ 3.28 (3.2847 as quoted by KellerJordan/modded-nanogpt) and HellaSwag 29.9.
- nanoGPT (README, "reproducing GPT-2"; config/train_gpt2.py): 491,520 tokens per step (12 x 1024 x 40 micro-batches
  on 8 GPUs), lr 6e-4, 2000 warmup, cosine to 6e-5 over 600,000 steps (~300B tokens), weight decay 0.1, β2 0.95:
  OpenWebText validation loss ~2.85 after about 4 days on 8xA100.

    python experiments/gpt2_124m.py --recipe smoke --data 'DIR/**/*.py' --tokenizer TOKENIZER_DIR   # one GPU
    python experiments/gpt2_124m.py --recipe cpu-smoke                                               # this CPU
    python experiments/gpt2_124m.py --recipe llmc --data tfds:fineweb...                             # the full run

The smoke recipe is llm.c's with its real schedule (the first --steps of 18,865), reporting tokens/s, MFU and the
loss curve. Data and tokenizer are what the machine has (no network): see experiments/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import common

_OPT = dict(lr=6e-4, beta1=0.9, beta2=0.95, weight_decay=0.1, grad_clip=1.0, eps=1e-8)
RECIPES = {
    "llmc": {
        "train": dict(_OPT, steps=18865, batch_size=512, seq_len=1024, warmup_steps=700, min_lr_ratio=0.0,
                      decay_steps=18865, eval_every=250, eval_batches=20, checkpoint_every=1000, log_every=10),
        "micro_batch": 32,
        "published": {"fineweb_val_loss": 3.28},
        "source": "llm.c discussion #481 / scripts/run_gpt2_124M.sh (10B FineWeb tokens); 3.2847 as quoted by "
                  "KellerJordan/modded-nanogpt",
    },
    "nanogpt": {
        "train": dict(_OPT, steps=600000, batch_size=480, seq_len=1024, warmup_steps=2000, min_lr_ratio=0.1,
                      decay_steps=600000, eval_every=1000, eval_batches=200, checkpoint_every=5000, log_every=10),
        "micro_batch": 12 * 4,
        "published": {"openwebtext_val_loss": 2.85},
        "source": "nanoGPT README, 'reproducing GPT-2': ~2.85 after ~4 days on 8xA100 (config/train_gpt2.py)",
    },
    "smoke": {
        "train": dict(_OPT, steps=200, batch_size=512, seq_len=1024, warmup_steps=700, min_lr_ratio=0.0,
                      decay_steps=18865, eval_every=100, eval_batches=8, checkpoint_every=0, log_every=1),
        "micro_batch": 32,
        "published": {},
        "source": "the llm.c recipe's first steps (same schedule); no published loss at this point",
    },
    "cpu-smoke": {
        "model": dict(n_layer=2, n_head=2, n_embd=128, n_positions=128),
        "train": dict(_OPT, steps=40, batch_size=16, seq_len=128, warmup_steps=5, min_lr_ratio=0.0, decay_steps=0,
                      eval_every=20, eval_batches=4, checkpoint_every=0, log_every=1),
        "micro_batch": 4,
        "tokenizer": "bpe:4096",
        "published": {},
        "source": "a shape-reduced smoke of the same code path (grad accumulation, schedule, BPE data)",
    },
}


def parse_args(argv=None) -> argparse.Namespace:
    p = common.parser(__doc__)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="smoke")
    p.add_argument("--data", default="default", metavar="SRC",
                   help="an aigc_jax --data source: default, a file/dir/glob, tfds:NAME (default: default)")
    p.add_argument("--tokenizer", default=None, metavar="SPEC",
                   help="a tokenizer directory (GPT-2's vocab.json+merges.txt or tokenizer.json), byte, or bpe:N "
                        "trained on the train split (default: bpe:50257; cpu-smoke: bpe:4096)")
    p.add_argument("--save-tokenizer", metavar="DIR", help="write the tokenizer there and stop (to carry it elsewhere)")
    p.add_argument("--steps", type=int, help="optimizer steps (the schedule's length is the recipe's)")
    p.add_argument("--micro-batch", type=int, help="sequences per forward/backward on one device "
                                                   "(grad_accum = batch / micro-batch; default: the recipe's)")
    p.add_argument("--skip-unreadable", action="store_true", help="skip files that are not UTF-8 instead of failing")
    common.add_common_args(p, "gpt2_124m")
    return p.parse_args(argv)


def configs_for(recipe: str, steps: int | None, micro_batch: int | None, overrides: list[str], backend: str):
    from aigc_jax import configs
    from aigc_jax.errors import UserError
    from aigc_jax.train.config import TrainConfig

    r = RECIPES[recipe]
    dtype = "bfloat16" if backend in ("gpu", "tpu") else "float32"
    model_config = configs.get_preset("gpt2").replace(**r.get("model", {}), dtype=dtype)
    train = dict(r["train"], **({"steps": steps} if steps else {}))
    model_config, train_config = common.apply_overrides(model_config, TrainConfig(**train), overrides)
    micro = min(micro_batch or r["micro_batch"], train_config.batch_size)
    if train_config.batch_size % micro:
        raise UserError(f"--micro-batch {micro} must divide the batch of {train_config.batch_size} sequences")
    return model_config, dataclasses.replace(train_config, grad_accum=train_config.batch_size // micro)


def make_tokenizer(spec: str, source: str, data_dir, skip_unreadable: bool):
    from aigc_jax import tokenizers as tok
    from aigc_jax.errors import UserError

    if spec == "byte":
        return tok.byte_level()
    if spec.startswith("bpe:"):
        try:
            size = int(spec[4:])
        except ValueError:
            raise UserError(f"--tokenizer {spec}: expected bpe:VOCAB_SIZE") from None
        return tok.train_bpe([common.train_text(source, data_dir, skip_unreadable)], size)
    if os.path.isdir(spec):
        return tok.load(spec)
    raise UserError(f"--tokenizer must be a directory, byte or bpe:N; got {spec!r}")


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    from aigc_jax import model
    from aigc_jax.train import loop

    name = "gpt2_124m_" + args.recipe.replace("-", "_")
    workdir, results_dir = common.default_dirs(args, name)
    recipe = RECIPES[args.recipe]
    model_config, train_config = configs_for(args.recipe, args.steps, args.micro_batch, args.set, jax.default_backend())
    spec = args.tokenizer or recipe.get("tokenizer", "bpe:50257")
    tokenizer_dir = workdir.rstrip("/") + ".tokenizer"  # a trained tokenizer is kept beside the workdir to resume
    if spec.startswith("bpe:") and os.path.isdir(tokenizer_dir) and not args.save_tokenizer:
        spec = tokenizer_dir
    tokenizer = make_tokenizer(spec, args.data, args.data_dir, args.skip_unreadable)
    if args.save_tokenizer:
        print(f"tokenizer with {tokenizer.vocab_size} ids -> {tokenizer.save(args.save_tokenizer)}")
        return 0
    tokenizer.save(tokenizer_dir)
    dataset = common.load_tokens(args.data, tokenizer, args.data_dir, args.skip_unreadable)
    run = loop.prepare(workdir, model_config, train_config, args.data, args.data_dir, tokenizer_dir, dataset=dataset)

    cfg, mcfg = run.train_config, run.model_config
    tokens_per_step = cfg.batch_size * cfg.seq_len
    print(f"{name}: {model.param_count(mcfg):,} params, vocab {tokenizer.vocab_size}, {len(dataset.train):,} train "
          f"tokens, {cfg.steps} steps x {tokens_per_step:,} tokens (grad_accum {cfg.grad_accum}), "
          f"{jax.default_backend()} ({jax.devices()[0].device_kind}), workdir {workdir}", flush=True)
    result = common.train_timed(run)
    flops = model.flops_per_token(mcfg, cfg.seq_len)
    tps = result["median_tokens_per_sec"]
    full = RECIPES["llmc"]["train"]
    summary = {
        "experiment": name,
        "published": recipe["published"],
        "published_source": recipe["source"],
        **result,
        "params": model.param_count(mcfg),
        "vocab_size": tokenizer.vocab_size,
        "train_tokens": int(len(dataset.train)),
        "tokens_per_step": tokens_per_step,
        "epochs": round(cfg.steps * tokens_per_step / len(dataset.train), 2),
        "flops_per_token": flops,
        "achieved_tflops": round(tps * flops / 1e12, 2) if tps else None,
        "llmc_full_run_hours_at_this_speed": round(full["steps"] * full["batch_size"] * full["seq_len"] / tps / 3600, 1)
        if tps else None,
        "data": args.data,
        "data_stats": dataset.stats.get("splits"),
        "model": mcfg.to_dict(),
        "train": cfg.to_dict(),
        "machine": common.machine(),
    }
    common.write_results(results_dir, summary, workdir)
    common.plot_curves({name: common.read_metrics(workdir)}, os.path.join(results_dir, "loss.png"),
                       f"{name}: {summary['machine']['device']}, {tps or 0:,.0f} tokens/s",
                       {f"published {k.replace('_', ' ')}": v for k, v in recipe["published"].items()})
    keys = ("final_step", "final_val_loss", "median_tokens_per_sec", "median_mfu", "wall_seconds_this_process")
    print({k: summary.get(k) for k in keys}, "->", results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(common.main_guard(main))
