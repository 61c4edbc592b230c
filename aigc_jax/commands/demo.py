"""`aigc-jax demo` (`make demo`): train a small GPT on the embedded corpus for a few CPU minutes, then generate.

Sized for a 2-core CPU and measured there (experiments/RESULTS.md, "make demo"): a 4-layer, 128-wide GPT-2 over a
1,024-token BPE trained on the corpus (≈2.7 bytes per token, so 128 tokens of context see ≈350 characters of
Python) reaches about 2 bits per byte on the complete validation split in 600 steps of 16 × 128 tokens. Byte-level
tokens would need ~3× the steps for the same text: at this budget they stop near 2.7 bits per byte.
The untrained model (the same seed's initial weights) and the trained one continue the same prompts side by side.
"""

from __future__ import annotations

import itertools
import json
import os
import textwrap

from aigc_jax import configs, modeldir
from aigc_jax.train.config import TrainConfig

PROMPTS = ("def ", "class ")
COLUMN = 58  # two columns and a separator fit a 120-character terminal


def register(sub) -> None:
    d = sub.add_parser("demo", help="train a small GPT on the embedded corpus for a few CPU minutes, then generate")
    d.add_argument("--workdir", default=os.path.join("runs", "demo"))
    d.add_argument("--steps", type=int, default=600, help="optimizer steps (~0.3 s each on a 2-core CPU)")
    d.set_defaults(func=run)


def recipe(steps: int) -> tuple[configs.ModelConfig, TrainConfig]:
    model_config = configs.get_preset("baby").replace(
        n_layer=4, n_head=4, n_embd=128, n_positions=128, dropout=0.0, attn_dropout=0.0
    )
    train_config = TrainConfig(steps=steps, batch_size=16, seq_len=128, lr=2e-3, warmup_steps=50, min_lr_ratio=0.1,
                               beta2=0.99, weight_decay=0.1, checkpoint_every=100, eval_every=200, eval_batches=8,
                               log_every=25)
    return model_config, train_config


def run(args) -> int:
    import jax

    from aigc_jax.decode import GenerationConfig, Generator
    from aigc_jax.model import init_params, param_count
    from aigc_jax.train import loop

    model_config, train_config = recipe(args.steps)
    run = loop.prepare(args.workdir, model_config, train_config, "default", None, "bpe:1024")
    cfg = run.model_config
    print(f"demo: a {cfg.n_layer}-layer, {cfg.n_embd}-wide GPT-2 ({param_count(cfg) / 1e6:.2f}M parameters) on the embedded "
          f"corpus (the Python standard library's sources + pydoc topics), {args.steps} steps of "
          f"{train_config.batch_size} x {train_config.seq_len} tokens, in {args.workdir} (re-running resumes)",
          flush=True)
    gen = GenerationConfig(max_new_tokens=120, temperature=0.8, top_k=40, seed=0, eos_ids=(run.tokenizer.eot_id,))
    prompts = [run.tokenizer.encode(p) for p in PROMPTS]
    untrained = Generator(cfg, init_params(cfg, jax.random.key(train_config.seed))).generate(prompts, gen)

    result = loop.train(run)
    print(json.dumps(result))
    trained_config, params, tokenizer = modeldir.load_workdir(args.workdir)
    trained = Generator(trained_config, params).generate(prompts, gen)
    for prompt, before, after in zip(PROMPTS, untrained, trained):
        left, right = (prompt + tokenizer.decode(_strip(ids, tokenizer.eot_id)) for ids in (before, after))
        print(f"\n{'untrained (step 0)':<{COLUMN}} | trained (step {result['step']})")
        print(f"{'-' * COLUMN}-+-{'-' * COLUMN}")
        print(side_by_side(left, right))
    if "val_bits_per_byte" in result:
        print(f"\nvalidation (complete split, {result['val_tokens']:,} tokens): {result['val_loss']:.3f} nats per "
              f"token = {result['val_bits_per_byte']:.3f} bits per byte")
    print(f"\nmore: aigc-jax generate --model {args.workdir} --prompt 'import ' --temperature 0.8 --top-k 40; "
          f"aigc-jax eval --workdir {args.workdir}")
    return 0


def side_by_side(left: str, right: str, width: int = COLUMN) -> str:
    """Two texts in columns, each line wrapped at `width` (tabs and control characters shown as spaces)."""
    def lines(text):
        out = []
        for line in text.expandtabs(4).splitlines() or [""]:
            clean = "".join(c if c.isprintable() else " " for c in line)
            out += textwrap.wrap(clean, width, replace_whitespace=False, drop_whitespace=False) or [""]
        return out

    rows = itertools.zip_longest(lines(left), lines(right), fillvalue="")
    return "\n".join(f"{a:<{width}} | {b}".rstrip() for a, b in rows)


def _strip(ids, eot_id):
    return ids[:-1] if ids and ids[-1] == eot_id else ids
