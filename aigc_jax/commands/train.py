"""`aigc-jax train` and `aigc-jax eval`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

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
    "steps": "optimizer steps in total; a resumed run continues up to this",
    "batch_size": "global sequences per optimizer step, over all devices and micro-batches",
    "seq_len": "tokens per sequence; 0 = the model's n_positions",
    "lr": "peak learning rate",
    "seed": "parameter init, dropout and data order all derive from it",
    "checkpoint_every": "save every N steps (and at the end, and on SIGTERM/SIGINT); 0 = only those",
    "parallel": "auto (pmap on a data-only mesh, else mesh) | pmap | shard_map | mesh",
    "grad_accum": "micro-batches per step (each holds batch_size / grad_accum rows)",
    "eval_every": "estimate the validation loss every N steps; 0 = only the complete pass at the end",
    "log_every": "write train metrics, and print a progress line outside a terminal, every N steps",
    "warmup_steps": "linear learning-rate warmup from 0",
    "sample_every": "print and record generated samples every N steps (and at the end); 0 = never",
    "mesh": "data=D,fsdp=F,tensor=T: shard parameters and optimizer state (fsdp) and heads/MLP/vocab (tensor) over a "
            "named mesh; omitted axes are 1, the product must equal the device count",
}
_SHOWN_DEFAULT = {"mesh": "every device on data"}  # where the config's value ("") would say nothing


def register(sub) -> None:
    from aigc_jax.train.config import TrainConfig

    p = sub.add_parser("train", help="train or fine-tune a model; re-running with the same --workdir resumes it",
                       description="A new run starts from the flags (unset ones take the defaults shown). An "
                       "existing --workdir resumes with the settings it recorded (run.json): repeat none of them; "
                       "--steps, the logging, evaluation and checkpoint cadence, --mesh and --parallel may change, "
                       "any other flag that contradicts the record is an error.")
    # Every default here is None so that a resume can tell a flag given from one left out; the help text shows
    # what a new run gets.
    configs.add_model_args(p, default=None, shown_default="baby for a new run")
    add_data_args(p, default=None)
    p.add_argument("--workdir", required=True, help="run directory: config, tokenizer, checkpoints, metrics")
    defaults = TrainConfig()
    for name, typ in _TRAIN_FLAGS.items():
        shown = _SHOWN_DEFAULT.get(name, getattr(defaults, name))
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=f"{_HELP[name]} (default: {shown})")
    p.add_argument("--tokenizer", default=None,
                   help="byte | char | bpe:VOCAB_SIZE | DIR with tokenizer files (default: byte)")
    p.add_argument("--init-from", metavar="SRC",
                   help="fine-tune from a model dir, training workdir or HF GPT-2/Llama/Qwen2/Mistral dir: its "
                        "architecture and runtime settings (dropout, dtype, …), changed only by what you --set "
                        "(default: none, a new model from --model)")
    p.add_argument("--no-progress", action="store_true",
                   help="plain progress lines even in a terminal (default: a tqdm bar in a terminal, plain lines "
                   "otherwise)")
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
    g.add_argument("--distributed", action="store_true", help="initialise jax.distributed (auto-detects SLURM/MPI/TPU; default: "
                   "off unless --coordinator or $AIGC_COORDINATOR is set)")
    g.add_argument("--coordinator", help="coordinator address host:port (implies --distributed; default: "
                   "$AIGC_COORDINATOR, else auto-detected)")
    g.add_argument("--num-processes", type=int, help="default: $AIGC_NUM_PROCESSES, else auto-detected")
    g.add_argument("--process-id", type=int, help="default: $AIGC_PROCESS_ID, else auto-detected")


def split_overrides(items: list[str]) -> tuple[dict, dict]:
    """--set k=v → (model overrides, train overrides); "model."/"train." prefixes optional when unambiguous."""
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


@dataclasses.dataclass
class Settings:
    """What a train command asks for: the flags given, else what the workdir recorded (a resume), else defaults."""

    model_config: Any  # None for a fine-tune: the source (or the workdir) has it
    model_overrides: dict  # a fine-tune's runtime keys
    train_config: Any  # TrainConfig
    data: str
    data_dir: str | None
    tokenizer: str
    init_from: str | None
    explicit: dict  # recorded key ("model", "model.dropout", "train.lr", "data", …) -> the flag that set it


def build_configs(args, record: dict | None = None) -> Settings:
    """The run's settings from --model/--config/--set, the train flags and, when resuming, the workdir's record.

    Flags left out take the record's values, so the workdir alone resumes a run; a flag given is compared with
    the record by prepare(), which names it when they differ. With --init-from there is no model config (the
    source has it): the --config file's model keys and the --set model keys come back as overrides, which
    prepare() limits to runtime keys."""
    from aigc_jax.train.config import TrainConfig

    record = record or {}
    model_over, train_over = split_overrides(args.set)
    file = configs.load_file(args.config) if args.config else {}
    file_model, file_train = configs.model_section(file), file.get("train", {})
    explicit = _explicit_flags(args, file_model, file_train, model_over, train_over)
    init_from = args.init_from or record.get("init_from")
    overrides = {**file_model, **model_over}
    if init_from:
        if args.model is not None:
            where = "" if args.init_from else f" (--workdir {args.workdir} fine-tunes {init_from})"
            raise UserError(f"--init-from takes the architecture from its source{where}: drop --model")
        model_config = None
    else:
        base = (configs.config_from_dict(record["model"]) if record and args.model is None
                else configs.get_preset(args.model or "baby"))
        model_config = configs.with_overrides(base, overrides, "model.") if overrides else base
        overrides = {}
    # How progress shows belongs to this terminal, not to the run: it is never taken from the record.
    recorded = {k: v for k, v in record.get("train", {}).items() if k != "progress"}
    flags = {k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k, None) is not None}
    train = {**recorded, **file_train, **train_over, **flags}
    if args.no_progress:
        train["progress"] = False
    return Settings(model_config, overrides, TrainConfig.from_dict(train),
                    args.data or record.get("data") or "default", args.data_dir or record.get("data_dir"),
                    args.tokenizer or record.get("tokenizer") or "byte", init_from, explicit)


def _explicit_flags(args, file_model: dict, file_train: dict, model_over: dict, train_over: dict) -> dict:
    """Which flag set each recorded setting, so that a contradiction on resume names the flag to drop."""
    out = {"model": f"--model {args.model}"} if args.model is not None else {}
    for section, keys in (("model", file_model), ("train", file_train)):
        out.update({f"{section}.{k}": f"--config {args.config}" for k in keys})
    for section, over in (("model", model_over), ("train", train_over)):
        out.update({f"{section}.{k}": f"--set {k}={v}" for k, v in over.items()})
    for name in _TRAIN_FLAGS:
        if getattr(args, name) is not None:
            out[f"train.{name}"] = f"--{name.replace('_', '-')} {getattr(args, name)}"
    for key in ("data", "tokenizer", "init_from"):
        if getattr(args, key) is not None:
            out[key] = f"--{key.replace('_', '-')} {getattr(args, key)}"
    return out


def _maybe_distributed(args) -> None:
    if args.distributed or args.coordinator or os.environ.get("AIGC_COORDINATOR"):
        from aigc_jax.parallel import initialize_distributed

        initialize_distributed(args.coordinator, args.num_processes, args.process_id)


def _train(args) -> int:
    _maybe_distributed(args)
    from aigc_jax.train import loop

    from aigc_jax.checkpoints import read_run_file

    s = build_configs(args, read_run_file(args.workdir))
    run = loop.prepare(args.workdir, s.model_config, s.train_config, s.data, s.data_dir, s.tokenizer, s.init_from,
                       model_overrides=s.model_overrides, explicit=s.explicit)
    result = loop.train(run)
    print(json.dumps(result))
    return 0


def _eval(args) -> int:
    from aigc_jax.train import evaluate

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
    out = evaluate.evaluate_workdir(args.workdir, args.split, args.data, args.data_dir, args.batch_size,
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
