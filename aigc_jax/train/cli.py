"""`aigc-jax train` and `aigc-jax eval`."""

from __future__ import annotations

import argparse
import json
import os

from aigc_jax import configs
from aigc_jax.data import add_data_args
from aigc_jax.errors import ConfigError, UserError

# Flag -> TrainConfig field, for the flags that mirror config keys (flags win over --config and --set).
_TRAIN_FLAGS = {
    "steps": int, "batch_size": int, "seq_len": int, "lr": float, "seed": int, "checkpoint_every": int,
    "parallel": str, "grad_accum": int, "eval_every": int, "log_every": int, "warmup_steps": int,
    "sample_every": int, "mesh": str,
}


_HELP = {
    "mesh": "data=D,fsdp=F,tensor=T: shard parameters and optimizer state (fsdp) and heads/MLP/vocab (tensor) over a "
            "named mesh; omitted axes are 1, the product must equal the device count (default: every device on "
            "data). A resumed run may use another mesh",
    "parallel": "auto (default: pmap on a data-only mesh, else mesh) | pmap | shard_map | mesh",
}


def register(sub) -> None:
    p = sub.add_parser("train", help="train or fine-tune a model; re-running the same command resumes it")
    configs.add_model_args(p, default=None)
    p.set_defaults(model=None)
    add_data_args(p)
    p.add_argument("--workdir", required=True, help="run directory: config, tokenizer, checkpoints, metrics")
    for name, typ in _TRAIN_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None,
                       help=_HELP.get(name, f"train.{name} (see aigc_jax/train/config.py)"))
    p.add_argument("--tokenizer", default="byte", help="byte (default) | char | bpe:VOCAB_SIZE | DIR with tokenizer files")
    p.add_argument("--init-from", metavar="SRC",
                   help="fine-tune from a model dir, training workdir or HF GPT-2/Llama/Qwen2/Mistral dir: its "
                        "architecture and runtime settings (dropout, dtype, …), changed only by what you --set; "
                        "without it --model defaults to baby")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    _add_distributed_args(p)
    p.set_defaults(func=_train)

    e = sub.add_parser(
        "eval", help="loss, perplexity and bits per byte (JSON) of any model on a text, or of a training workdir",
        description="--model SRC --data TEXT: any model (HF dir, aigc_jax model dir, training workdir) on the whole "
        "of a text, tokenized with the model's own tokenizer (each document followed by end-of-text, no BOS), in "
        "non-overlapping windows of the model's context (--seq-len), every token but the first predicted once; "
        "the tokens after the last whole window are scored in one more window ending at the text's end. "
        "--workdir DIR: a training run's latest checkpoint on its validation (or train) split.")
    e.add_argument("--model", metavar="SRC", help="model dir, training workdir or HF GPT-2/Llama/Qwen2/Mistral dir")
    e.add_argument("--workdir", help="a training workdir, evaluated on its own data splits")
    e.add_argument("--split", default=None, help="--workdir: validation (default) or train")
    e.add_argument("--data", default=None, metavar="SRC",
                   help="--model: default (Python stdlib sources + pydoc topics) | a text file, directory or glob "
                   "(default: default); --workdir: data source (default: the one the run was trained on)")
    e.add_argument("--data-dir", default=None)
    e.add_argument("--seq-len", type=int, default=0, help="--model: window length (default: the model's context)")
    e.add_argument("--no-progress", action="store_true", help="--model: no progress bar or progress lines")
    e.add_argument("--batch-size", type=int, default=None,
                   help="rows per batch (default: --model 8; --workdir the run's micro-batch)")
    e.add_argument("--max-batches", type=int, default=0,
                   help="estimate from N batches drawn across the split with a fixed seed (0 = a complete pass)")
    e.add_argument("--parallel", default=None, choices=["auto", "pmap", "shard_map", "mesh"])
    e.add_argument("--mesh", default=None, metavar="data=D,fsdp=F,tensor=T",
                   help="evaluate on this mesh (default: every device on data), whatever mesh trained the run")
    e.set_defaults(func=_eval)


def _add_distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-host (jax.distributed)")
    g.add_argument("--distributed", action="store_true", help="initialise jax.distributed (auto-detects SLURM/MPI/TPU)")
    g.add_argument("--coordinator", help="coordinator address host:port (implies --distributed)")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)


def split_overrides(items: list[str]) -> tuple[dict, dict]:
    """--set k=v → (model overrides, train overrides); "model."/"train." prefixes optional when unambiguous."""
    import dataclasses

    from aigc_jax.train.config import TrainConfig

    model_keys = configs.model_keys()
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    model, train = {}, {}
    for key, value in configs.parse_assignments(items).items():
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
    """(model config or None, model overrides, train config) from --model/--config/--set and the train flags.

    With --init-from there is no model config (the source has it): the --config file's model section and the
    --set model keys come back as overrides, which prepare() limits to runtime keys."""
    from aigc_jax.train.config import TrainConfig

    model_over, train_over = split_overrides(args.set)
    file = configs.load_file(args.config) if args.config else {}
    if getattr(args, "init_from", None):
        if args.model is not None:
            raise UserError("--init-from takes the architecture from its source: drop --model")
        model_config = None
        model_over = {**(file.get("model", {}) if {"model", "train"} & set(file) else {}), **model_over}
    else:
        model_config = configs.model_config(args.model or "baby", args.config, model_over)
        model_over = {}
    train_dict = dict(file.get("train", {}))
    train_dict.update(train_over)
    train_dict.update({k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k, None) is not None})
    if getattr(args, "no_progress", False):
        train_dict["progress"] = False
    return model_config, model_over, TrainConfig.from_dict(train_dict)


def _maybe_distributed(args) -> None:
    if args.distributed or args.coordinator or os.environ.get("AIGC_COORDINATOR"):
        from aigc_jax.parallel import initialize_distributed

        initialize_distributed(args.coordinator, args.num_processes, args.process_id)


def _train(args) -> int:
    _maybe_distributed(args)
    from aigc_jax.train import loop

    model_config, model_over, train_config = build_configs(args)
    run = loop.prepare(args.workdir, model_config, train_config, args.data, args.data_dir, args.tokenizer,
                       args.init_from, model_overrides=model_over)
    result = loop.train(run)
    print(json.dumps(result))
    return 0


def _eval(args) -> int:
    from aigc_jax.train import loop

    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if (args.model is None) == (args.workdir is None):
        raise UserError("eval needs --model SRC (any model, on --data TEXT) or --workdir DIR (a training run), "
                        "not both")
    if args.model is not None:
        return _eval_model(args)
    args.split = args.split or "validation"
    if args.max_batches < 0:
        raise UserError(f"--max-batches must be >= 0 (0 = a complete pass), got {args.max_batches}")
    out = loop.evaluate_workdir(args.workdir, args.split, args.data, args.data_dir, args.batch_size,
                                args.max_batches, args.parallel, args.mesh)
    print(json.dumps(out))
    return 0


def _eval_model(args) -> int:
    from aigc_jax.train import perplexity

    ignored = [flag for flag, given in (("--split", args.split), ("--max-batches", args.max_batches)) if given]
    if ignored:
        raise UserError(f"{ignored[0]} applies to --workdir evaluation; --model evaluates the whole --data text")
    out = perplexity.evaluate_text(args.model, args.data or "default", args.data_dir, args.seq_len,
                                   args.batch_size or 0, args.parallel or "auto", args.mesh or "",
                                   progress=not args.no_progress)
    print(json.dumps(out))
    return 0
