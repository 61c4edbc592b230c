"""`aigc-jax train`, `aigc-jax eval` and `aigc-jax demo`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from aigc_jax.cli import add_model_args
from aigc_jax.data import add_data_args
from aigc_jax.errors import ConfigError, UserError

# Flag -> TrainConfig field, for the flags that mirror config keys (flags win over --config and --set).
_TRAIN_FLAGS = {
    "steps": int, "batch_size": int, "seq_len": int, "lr": float, "seed": int, "checkpoint_every": int,
    "parallel": str, "grad_accum": int, "eval_every": int, "log_every": int, "warmup_steps": int,
    "sample_every": int,
}


def register(sub) -> None:
    p = sub.add_parser("train", help="train or fine-tune a model; re-running the same command resumes it")
    add_model_args(p, default="baby")
    add_data_args(p)
    p.add_argument("--workdir", required=True, help="run directory: config, tokenizer, checkpoints, metrics")
    for name, typ in _TRAIN_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None,
                       help=f"train.{name} (see aigc_jax/train/config.py)")
    p.add_argument("--tokenizer", default="byte", help="byte (default) | char | bpe:VOCAB_SIZE | DIR with tokenizer files")
    p.add_argument("--init-from", metavar="SRC", help="fine-tune from a model dir, training workdir or HF GPT-2/Llama/Qwen2/Mistral dir")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    _add_distributed_args(p)
    p.set_defaults(func=_train)

    e = sub.add_parser("eval", help="loss, perplexity and bits per byte of a workdir's latest checkpoint (JSON)")
    e.add_argument("--workdir", required=True)
    e.add_argument("--split", default="validation", help="validation (default) or train")
    e.add_argument("--data", default=None, help="data source (default: the one the run was trained on)")
    e.add_argument("--data-dir", default=None)
    e.add_argument("--batch-size", type=int, default=None)
    e.add_argument("--max-batches", type=int, default=0, help="0 = a complete pass")
    e.add_argument("--parallel", default=None, choices=["pmap", "shard_map"])
    e.set_defaults(func=_eval)

    d = sub.add_parser("demo", help="train the baby model on the embedded corpus for a few minutes, then generate")
    d.add_argument("--workdir", default=os.path.join("runs", "demo"))
    d.add_argument("--steps", type=int, default=300, help="optimizer steps (~0.5 s each on a 2-core CPU)")
    d.set_defaults(func=_demo)


def _add_distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-host (jax.distributed)")
    g.add_argument("--distributed", action="store_true", help="initialise jax.distributed (auto-detects SLURM/MPI/TPU)")
    g.add_argument("--coordinator", help="coordinator address host:port (implies --distributed)")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)


def split_overrides(items: list[str]) -> tuple[dict, dict]:
    """--set k=v → (model overrides, train overrides); "model."/"train." prefixes optional when unambiguous."""
    from aigc_jax.configs import FAMILIES, parse_assignments
    from aigc_jax.train.config import TrainConfig

    model_keys = {f.name for cls in FAMILIES.values() for f in dataclasses.fields(cls)}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    model, train = {}, {}
    for key, value in parse_assignments(items).items():
        section, _, name = key.rpartition(".")
        if section == "model" or (not section and name in model_keys):
            model[name] = value
        elif section == "train" or (not section and name in train_keys):
            train[name] = value
        else:
            raise ConfigError(f"--set {key}: unknown key; model keys: {', '.join(sorted(model_keys))}; "
                              f"train keys: {', '.join(sorted(train_keys))}")
    return model, train


def build_configs(args):
    from aigc_jax import configs
    from aigc_jax.train.config import TrainConfig

    model_over, train_over = split_overrides(args.set)
    model_config = configs.model_config(args.model, args.config, model_over)
    train_dict = {}
    if args.config:
        train_dict.update(configs.load_file(args.config).get("train", {}))
    train_dict.update(train_over)
    train_dict.update({k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k, None) is not None})
    if getattr(args, "no_progress", False):
        train_dict["progress"] = False
    return model_config, TrainConfig.from_dict(train_dict)


def _maybe_distributed(args) -> None:
    if args.distributed or args.coordinator or os.environ.get("AIGC_COORDINATOR"):
        from aigc_jax.parallel import initialize_distributed

        initialize_distributed(args.coordinator, args.num_processes, args.process_id)


def _train(args) -> int:
    _maybe_distributed(args)
    from aigc_jax.train import loop

    model_config, train_config = build_configs(args)
    runtime = None
    if args.init_from:  # the source's runtime keys, except those given by --config/--set (not the preset's)
        from aigc_jax import configs

        file_model = configs.load_file(args.config).get("model", {}) if args.config else {}
        runtime = {**file_model, **split_overrides(args.set)[0]}
    run = loop.prepare(args.workdir, model_config, train_config, args.data, args.data_dir, args.tokenizer,
                       args.init_from, runtime_overrides=runtime)
    result = loop.train(run)
    print(json.dumps(result))
    return 0


def _eval(args) -> int:
    from aigc_jax.train import loop

    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_batches < 0:
        raise UserError(f"--max-batches must be >= 0 (0 = a complete pass), got {args.max_batches}")
    out = loop.evaluate_workdir(args.workdir, args.split, args.data, args.data_dir, args.batch_size,
                                args.max_batches, args.parallel)
    print(json.dumps(out))
    return 0


def _demo(args) -> int:
    """Sized for a 2-core CPU: ~3 minutes of training, then a few samples. In a fixed budget of tokens, small
    batches (4 × 128) give more optimizer steps and a lower loss than the recipe's 64 × 256."""
    from aigc_jax import configs
    from aigc_jax.train import loop
    from aigc_jax.train.config import TrainConfig

    model_config = configs.get_preset("baby").replace(dropout=0.0, attn_dropout=0.0)  # short runs: no dropout
    train_config = TrainConfig(steps=args.steps, batch_size=4, seq_len=128, lr=1e-3, warmup_steps=10,
                               min_lr_ratio=0.1, beta2=0.99, weight_decay=0.1, checkpoint_every=100,
                               eval_every=0, eval_batches=8, log_every=10, sample_every=0)
    run = loop.prepare(args.workdir, model_config, train_config, "default", None, "byte")
    print(f"training the baby model ({model_config.n_layer} layers, {model_config.n_embd} wide) on the embedded "
          f"corpus for {args.steps} steps in {args.workdir} (re-running resumes)")
    result = loop.train(run)
    print(json.dumps(result))
    from aigc_jax.api import load

    lm = load(args.workdir)
    prompts = ["def ", "The ", "import "]
    for prompt, text in zip(prompts, lm.generate(prompts, max_new_tokens=120, temperature=0.8, top_k=40, seed=0)):
        print(f"\n--- prompt {prompt!r} ---\n{prompt}{text}")
    print(f"\nmore: aigc-jax generate --model {args.workdir} --prompt 'class ' --temperature 0.8 --top-k 40; "
          f"aigc-jax eval --workdir {args.workdir}")
    return 0
