"""nanoGPT's shakespeare_char "baby GPT", trained with aigc_jax.

Published (nanoGPT README, "quick start"): `python train.py config/train_shakespeare_char.py` — 6 layers, 6 heads,
384 wide, context 256, batch 64, dropout 0.2, lr 1e-3 (100 warmup iterations, cosine to 1e-4 at 5000), β2 0.99 —
"On one A100 GPU this training run takes about 3 minutes and the best validation loss is 1.4697."
Its CPU variant (same section, "I only have a macbook"): 4 layers, 4 heads, 128 wide, context 64, batch 12,
2000 iterations, dropout 0 — "gets us a loss of only 1.88".

    python experiments/shakespeare_char.py --text-file ../shared/data/tinyshakespeare.txt                  # full
    python experiments/shakespeare_char.py --text-file ../shared/data/tinyshakespeare.txt --variant cpu-small
    python experiments/shakespeare_char.py --data tfds:tiny_shakespeare --data-dir DIR                    # stock tfds

How the recipe maps onto aigc_jax, and where it differs, is in experiments/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys

import common

# nanoGPT config/train_shakespeare_char.py plus train.py defaults (weight_decay 0.1, beta1 0.9, grad_clip 1.0);
# model.py's MLP uses nn.GELU(), the exact (erf) GELU, and the recipe sets bias=False (no Linear/LayerNorm biases).
_TRAIN = dict(lr=1e-3, warmup_steps=100, min_lr_ratio=0.1, decay_steps=0, beta1=0.9, beta2=0.99, weight_decay=0.1,
              grad_clip=1.0, eval_every=250, eval_batches=0, log_every=10)
RECIPES = {
    "full": {
        "model": dict(n_layer=6, n_head=6, n_embd=384, n_positions=256, dropout=0.2, attn_dropout=0.2,
                      activation="gelu", bias=False),
        "train": dict(_TRAIN, steps=5000, batch_size=64, seq_len=256, checkpoint_every=1000),
        "published": {"best_val_loss": 1.4697},
        "source": "nanoGPT README, quick start ('I have a GPU'): best validation loss 1.4697, about 3 minutes on "
                  "one A100",
    },
    "cpu-small": {
        "model": dict(n_layer=4, n_head=4, n_embd=128, n_positions=64, dropout=0.0, attn_dropout=0.0,
                      activation="gelu", bias=False),
        "train": dict(_TRAIN, steps=2000, batch_size=12, seq_len=64, checkpoint_every=500),
        "published": {"val_loss": 1.88},
        "source": "nanoGPT README, quick start ('I only have a macbook'): --block_size=64 --batch_size=12 --n_layer=4 "
                  "--n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0: 'a loss of only 1.88'",
    },
}


def parse_args(argv=None) -> argparse.Namespace:
    p = common.parser(__doc__, epilog="Results: summary.json, metrics.jsonl and loss.png in --results-dir.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text-file", metavar="PATH",
                     help="tinyshakespeare.txt: first 90%% of characters train, last 10%% validate")
    src.add_argument("--data", metavar="SRC",
                     help="any aigc_jax --data source, e.g. tfds:tiny_shakespeare (prepared in --data-dir)")
    p.add_argument("--variant", choices=sorted(RECIPES), default="full",
                   help="full (the published GPU run) or cpu-small")
    p.add_argument("--steps", type=int, help="stop after N optimizer steps; the cosine schedule is shortened to N too")
    common.add_common_args(p, "shakespeare_char")
    return p.parse_args(argv)


def configs_for(variant: str, steps: int | None, overrides: list[str], backend: str):
    """(ModelConfig, TrainConfig) of a variant: the `baby` preset reshaped to the recipe, then --steps and --set."""
    from aigc_jax import configs
    from aigc_jax.train.config import TrainConfig

    recipe = RECIPES[variant]
    # nanoGPT trains in bf16 autocast on GPUs that support it, fp32 elsewhere.
    dtype = "bfloat16" if backend in ("gpu", "tpu") else "float32"
    model_config = configs.get_preset("baby").replace(**recipe["model"], dtype=dtype)
    train = dict(recipe["train"], **({"steps": steps} if steps else {}))
    return common.apply_overrides(model_config, TrainConfig(**train), overrides)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    from aigc_jax import data, model
    from aigc_jax import tokenizers as tok
    from aigc_jax.errors import UserError
    from aigc_jax.train import loop

    name = "shakespeare_char" + ("" if args.variant == "full" else "_" + args.variant.replace("-", "_"))
    workdir, results_dir = common.default_dirs(args, name)
    model_config, train_config = configs_for(args.variant, args.steps, args.set, jax.default_backend())

    # nanoGPT's prepare.py: the vocabulary is every distinct character of the whole file, sorted.
    if args.text_file:
        if not os.path.isfile(args.text_file):
            raise UserError(f"--text-file {args.text_file}: no such file")
        with open(args.text_file, encoding="utf-8") as f:
            text = f.read()
        source = args.text_file
    else:
        text, source = data.load_text(args.data, data_dir=args.data_dir, split="train"), args.data
    tokenizer = tok.char_level(text)
    tokenizer_dir = workdir.rstrip("/") + ".tokenizer"  # beside the workdir, so a re-run resumes
    tokenizer.save(tokenizer_dir)
    dataset = common.load_tokens(source, tokenizer, args.data_dir)
    run = loop.prepare(workdir, model_config, train_config, source, args.data_dir, tokenizer_dir, dataset=dataset)
    T = run.train_config.seq_len

    cfg, H200 = run.train_config, common.H200_BF16_TFLOPS
    tokens = cfg.steps * cfg.batch_size * T
    flops = model.flops_per_token(run.model_config, T)
    print(f"{name}: {model.param_count(run.model_config):,} params, vocab {tokenizer.vocab_size} "
          f"({tokenizer.vocab_size - 1} characters + end-of-text), {len(dataset.train):,} train / "
          f"{len(dataset.validation):,} validation tokens, {cfg.steps} steps x {cfg.batch_size} x {T}, "
          f"shift_windows {run.train_config.shift_windows}, {jax.default_backend()} ({jax.devices()[0].device_kind}), workdir {workdir}",
          flush=True)
    summary = {
        "experiment": name,
        "published": RECIPES[args.variant]["published"],
        "published_source": RECIPES[args.variant]["source"],
        **common.train_timed(run),
        "shift_windows": run.train_config.shift_windows,
        "params": model.param_count(run.model_config),
        "vocab_size": tokenizer.vocab_size,
        "train_tokens": int(len(dataset.train)),
        "validation_tokens": int(len(dataset.validation)),
        "tokens_trained": tokens,
        "epochs": round(tokens / len(dataset.train), 2),
        "flops_per_token": flops,
        "h200_estimate_seconds_at_mfu": {f"{m:.0%}": round(common.estimate_seconds(flops, tokens, H200, m))
                                         for m in (0.1, 0.2, 0.4)},
        "model": run.model_config.to_dict(),
        "train": cfg.to_dict(),
        "data": source,
        "workdir": workdir,
        "machine": common.machine(),
    }
    common.write_results(results_dir, summary, workdir)
    published = RECIPES[args.variant]["published"]
    common.plot_curves({name: common.read_metrics(workdir)}, os.path.join(results_dir, "loss.png"),
                       f"{name}: {summary['machine']['device']}, {cfg.steps} steps, "
                       f"{summary['wall_seconds_this_process']:.0f} s",
                       {f"nanoGPT {k.replace('_', ' ')}": v for k, v in published.items()}, ylim=(0.8, 4.5))
    keys = ("final_step", "final_val_loss", "best_val_loss", "best_val_step", "wall_seconds_this_process",
            "median_tokens_per_sec")
    print({k: summary[k] for k in keys}, "->", results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(common.main_guard(main))
