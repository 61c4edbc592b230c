"""Run preparation: resolve and validate configs, tokenizer, data and any existing workdir into a `Run`.

`prepare()` raises a one-line `UserError` on anything wrong *before* a single file is written. A fresh start then
writes the run files (model.json, tokenizer.json, then run.json last: `write_run_files`), so a run killed at any
instant is re-run by the same command: it resumes, or (killed before run.json landed) starts cleanly over its own
files.

Resume is checked, not trusted: run.json records the model config, the data source *and a hash of its token
stream*, the tokenizer spec *and its hash*, and the fine-tuning source; a re-run that differs in any of them
(other than the keys in RESUMABLE_CHANGES) is a one-line error naming both values, and the flag that set it when
the caller says (`explicit`: the CLI fills what was not given from run.json, so only a given flag can differ).
A resumed run reads its tokenizer and model config from the workdir, never from the corpus or the `--init-from`
source again.

Over 300 lines because the record and every check against it are one job: the run.json a start writes, the
comparisons a resume makes with it, and the checkpoint meta that ties a checkpoint to it change together.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax

from aigc_jax import checkpoints as ckpt
from aigc_jax import configs, data, fileio, modeldir
from aigc_jax import tokenizers as tok
from aigc_jax.errors import UserError
from aigc_jax.train import optimizer as optim
from aigc_jax.train.config import RESUMABLE_CHANGES, TrainConfig
from aigc_jax.train.layout import Layout
from aigc_jax.train.metrics import check_tracking

# What a fresh start writes before run.json: a workdir holding only these (and temporary files) was killed
# mid-start and may be started over.
_START_FILES = (modeldir.MODEL_FILE, tok.FILE, "metrics.jsonl", "tb")


@dataclasses.dataclass
class Run:
    """Everything a run needs, resolved and validated; nothing written yet."""

    workdir: str
    model_config: configs.ModelConfig
    train_config: TrainConfig
    tokenizer: tok.Tokenizer
    data: Any  # aigc_jax.data.TokenData
    record: dict  # what run.json holds; a re-run must match it
    init_params: Any = None  # weights to fine-tune from (fresh optimizer), or None for a random init
    resume_step: int | None = None
    notes: tuple[str, ...] = ()  # what prepare() found worth telling (settings, schedule changes)
    layout: Layout | None = None  # where state and batches live (set by prepare)


def prepare(
    workdir: str,
    model_config: configs.ModelConfig | None = None,
    train_config: TrainConfig = TrainConfig(),
    data_source: str = "default",
    data_dir: str | None = None,
    tokenizer_spec: str = "byte",
    init_from: str | None = None,
    dataset: data.TokenData | None = None,
    model_overrides: dict | None = None,
    explicit: dict | None = None,
) -> Run:
    """Validates the run against data, devices and an existing workdir. Writes nothing.

    A fresh run's architecture is `model_config` (preset, file and overrides already applied; vocab_size follows
    the tokenizer). A fine-tune (`init_from`: model dir, workdir or HF dir) takes the source's whole config,
    runtime settings included (e.g. its dropout), and changes only the RUNTIME_KEYS in `model_overrides`; pass no
    `model_config` then. `dataset`: tokens already loaded (e.g. on a machine without tensorflow-datasets); it is
    used instead of loading `data_source`, which then only names the data in run.json. `explicit`: which flag set
    each recorded key ("train.lr" -> "--lr 0.1"), so that a resume contradicting the workdir names the flag."""
    overrides = dict(model_overrides or {})
    if init_from and model_config is not None:
        raise UserError("--init-from takes the architecture from its source: drop --model/--config model keys "
                        "(runtime settings such as dropout go in --set)")
    _check_workdir(workdir)
    previous = ckpt.read_run_file(workdir)
    if not init_from and previous is None:  # a resume reads its tokenizer from the workdir, wherever it came from
        _check_tokenizer_spec(tokenizer_spec)
    if previous is None and not _is_unfinished_start(workdir):
        raise UserError(f"--workdir {workdir} is not empty and holds no aigc_jax run; choose a new or empty directory")
    resume_step = ckpt.latest_step(workdir) if previous is not None else None
    model_config, init, tokenizer, tokenizer_spec = _model_and_tokenizer(
        workdir, previous, model_config, tokenizer_spec, data_source, data_dir, init_from, overrides)

    check_tracking(train_config.wandb_project)
    seq_len = train_config.seq_len or model_config.n_positions
    if seq_len > model_config.n_positions:
        raise UserError(f"--seq-len {seq_len} exceeds the model's context n_positions={model_config.n_positions}")
    train_config = dataclasses.replace(train_config, seq_len=seq_len)
    layout = Layout.resolve(train_config, model_config)
    record = _run_record(model_config, train_config, data_source, data_dir, tokenizer_spec, tokenizer, init_from)
    if previous is not None:  # before the data load, which may take minutes
        _check_same_settings(workdir, previous, record, explicit or {})
    if dataset is None:
        dataset = data.load(data_source, tokenizer, data_dir=data_dir)
    # Too little text for one window (train or validation) must fail here, not in train() after the run files exist.
    data.Batches(dataset.train, seq_len, train_config.batch_size, train_config.seed,
                 shift_windows=train_config.shift_windows)
    data.num_eval_batches(dataset.validation, seq_len, train_config.batch_size // train_config.grad_accum)
    record["data_hash"] = dataset.content_hash
    notes = [_settings_line(model_config, train_config, init_from, overrides)]
    if previous is not None:
        _check_same_data(workdir, previous, record)
        notes += _resume_notes(previous, record, resume_step)
    return Run(workdir, model_config, train_config, tokenizer, dataset, record, init, resume_step, tuple(notes),
               layout)


def _model_and_tokenizer(workdir, previous, model_config, tokenizer_spec, data_source, data_dir, init_from,
                         overrides):
    """(model config, weights to fine-tune from or None, tokenizer, tokenizer spec to record)."""
    init = None
    if previous is not None:
        # The workdir holds the tokenizer and the config it was started with: a resume reads them, so a char/bpe
        # vocabulary is never re-derived and a fine-tune's source may have moved.
        tokenizer = tok.load(workdir)
        _check_tokenizer(workdir, previous, tokenizer, "its tokenizer.json")
        if os.path.isdir(tokenizer_spec):  # the tokenizer files the command names must still be the run's
            _check_tokenizer(workdir, previous, tok.load(tokenizer_spec), f"--tokenizer {tokenizer_spec}")
        if init_from:
            model_config = modeldir.load_config(workdir)
    elif init_from:
        model_config, init, tokenizer = modeldir.load_any(init_from)
        if tokenizer is None:
            raise UserError(f"{init_from} has no tokenizer files; fine-tuning needs the tokenizer the model was trained with")
    else:
        tokenizer = _make_tokenizer(tokenizer_spec, data_source, data_dir)
    if init_from:
        model_config = _finetune_config(model_config, overrides)
        tokenizer_spec = previous["tokenizer"] if previous is not None else f"from:{init_from}"
    elif model_config is None:
        model_config = configs.get_preset("baby")
    if not init_from:
        model_config = model_config.replace(vocab_size=tokenizer.vocab_size)
        if overrides:
            model_config = configs.with_overrides(model_config, overrides, "model.")
    if tokenizer.vocab_size > model_config.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.vocab_size} ids but the model only {model_config.vocab_size}")
    return model_config, init, tokenizer, tokenizer_spec


def _run_record(model_config, train_config, data_source, data_dir, tokenizer_spec, tokenizer, init_from) -> dict:
    return {
        "model": model_config.to_dict(),
        "train": train_config.to_dict(),
        "data": data_source,
        "data_hash": None,  # set once the data is loaded
        "data_dir": os.path.abspath(data_dir) if data_dir else None,  # where its token cache is: not compared
        "tokenizer": tokenizer_spec,
        "tokenizer_hash": data.tokenizer_hash(tokenizer),
        "init_from": os.path.abspath(init_from) if init_from else None,
        # Informational (not compared on resume): what "auto" settings resolved to on the machine that started it.
        "runtime": {"dtype": configs.compute_dtype(model_config).name, "backend": jax.default_backend(),
                    "devices": jax.device_count()},
    }


def _check_tokenizer(workdir: str, previous: dict, tokenizer: tok.Tokenizer, what: str) -> None:
    recorded, found = previous.get("tokenizer_hash"), data.tokenizer_hash(tokenizer)
    if recorded is not None and recorded != found:
        raise UserError(f"--workdir {workdir}: {what} is not the tokenizer the run started with (tokenizer_hash "
                        f"{found}, the run has {recorded}); restore it or use a new --workdir")


def _finetune_config(source: configs.ModelConfig, overrides: dict) -> configs.ModelConfig:
    """The source's config; only runtime keys may change (the architecture is what the weights are)."""
    overrides = configs.check_overrides(source, overrides, "the model being fine-tuned")
    return configs.Runtime.of(source).with_overrides(overrides).apply(source) if overrides else source


def _settings_line(mcfg, tcfg: TrainConfig, init_from: str | None, overrides: dict) -> str:
    """The effective settings, said once at start: what a run trains is never a guess."""
    runtime = configs.Runtime.of(mcfg).describe()
    origin = f"fine-tuning {init_from} (its config; set here: {', '.join(sorted(overrides)) or 'nothing'})" \
        if init_from else f"{mcfg.family} {mcfg.n_layer}x{mcfg.n_embd}"
    lr = f"lr={tcfg.lr:g} {tcfg.schedule} warmup={tcfg.warmup_steps}"
    return (f"{origin}; {runtime}; steps={tcfg.steps} batch={tcfg.batch_size}x{tcfg.seq_len} "
            f"grad_accum={tcfg.grad_accum} {lr} weight_decay={tcfg.weight_decay} seed={tcfg.seed}")


def _resume_notes(previous: dict, record: dict, resume_step: int | None) -> list[str]:
    notes = []
    old_rt, new_rt = previous.get("runtime") or {}, record["runtime"]
    if old_rt and (old_rt.get("dtype"), old_rt.get("backend")) != (new_rt["dtype"], new_rt["backend"]):
        notes.append(f"note: this run started with dtype={old_rt.get('dtype')} on {old_rt.get('backend')}; it "
                     f"continues with dtype={new_rt['dtype']} on {new_rt['backend']} (set model.dtype to pin it)")
    old_train, new_train = previous.get("train", {}), record["train"]
    if resume_step is not None and old_train.get("steps") != new_train["steps"]:
        old_lr = float(optim.schedule(TrainConfig.from_dict(old_train))(resume_step))
        new_lr = float(optim.schedule(TrainConfig.from_dict(new_train))(resume_step))
        if not math.isclose(old_lr, new_lr, rel_tol=1e-6):
            notes.append(f"note: --steps {old_train.get('steps')} -> {new_train['steps']} changes the "
                         f"{new_train['schedule']} schedule: the lr at step {resume_step} moves from {old_lr:.3g} to "
                         f"{new_lr:.3g}. To extend runs without a jump, train with --set schedule=wsd (and extend "
                         "before its decay) or fix --set decay_steps=N")
    return notes


def _check_workdir(workdir: str) -> None:
    """A workdir that is (or lies under) a file, or whose checkpoints/ is a file, cannot hold a run."""
    fileio.check_output_dir(workdir, "--workdir")
    checkpoints = os.path.join(workdir, ckpt.CHECKPOINTS)
    if os.path.exists(checkpoints) and not os.path.isdir(checkpoints):
        raise UserError(f"--workdir {workdir}: {checkpoints} is a file where the checkpoint directory belongs; "
                        "move it away or use a new --workdir")


def _is_unfinished_start(workdir: str) -> bool:
    """True for a new or empty workdir, or one a start was killed in before run.json landed: it holds only the
    files a start writes first, temporary files, and a checkpoint directory without a finished step."""
    if not os.path.isdir(workdir):
        return True
    for name in os.listdir(workdir):
        if name == ckpt.CHECKPOINTS:
            if ckpt.latest_step(workdir) is not None:
                return False
        elif name not in _START_FILES and not fileio.is_temporary(name):
            return False
    return True


def _check_tokenizer_spec(spec: str) -> None:
    if spec in ("byte", "char") or os.path.isdir(spec):
        return
    if spec.startswith("bpe:"):
        try:
            if int(spec[4:]) >= 1:
                return
        except ValueError:
            pass
        raise UserError(f"--tokenizer {spec}: expected bpe:VOCAB_SIZE, e.g. bpe:8192")
    raise UserError(f"--tokenizer must be byte, char, bpe:N or a directory with tokenizer files; got {spec!r}")


def _make_tokenizer(spec: str, data_source: str, data_dir: str | None) -> tok.Tokenizer:
    if spec == "byte":
        return tok.byte_level()
    if spec == "char":
        return tok.char_level(data.load_text(data_source, data_dir=data_dir, split="train"))
    if spec.startswith("bpe:"):
        return tok.train_bpe([data.load_text(data_source, data_dir=data_dir, split="train")], int(spec[4:]))
    return tok.load(spec)


def _check_same_settings(workdir: str, previous: dict, record: dict, explicit: dict) -> None:
    for key, old, new in _setting_differences(previous, record):
        flag = explicit.get(key) or explicit.get(key.partition(".")[0])
        if flag:  # the workdir alone resumes a run: a flag given that disagrees with it is the thing to drop
            raise UserError(f"{flag} contradicts --workdir {workdir}, whose run has {key}={old!r} (this command: "
                            f"{new!r}); drop {flag} to resume it, or use a new --workdir")
        raise UserError(f"--workdir {workdir} holds a run with {key}={old!r}, this command has {new!r}; re-run with "
                        "the original settings or use a new --workdir")


def _check_same_data(workdir: str, previous: dict, record: dict) -> None:
    """Content, not names: the same --data path with other text."""
    if previous.get("data_hash") is not None and previous["data_hash"] != record["data_hash"]:
        raise UserError(f"--workdir {workdir}: --data {record['data']} now holds different tokens (data_hash "
                        f"{record['data_hash']}, the run has {previous['data_hash']}); restore the original data or "
                        "use a new --workdir")


def _setting_differences(previous: dict, record: dict):
    """(key, recorded value, this command's value) for each setting a resume may not change, compared as JSON
    (run.json has lists where configs have tuples)."""
    for section in ("model", "data", "tokenizer", "init_from"):
        old, new = _as_json(previous.get(section)), _as_json(record[section])
        if section == "model" and isinstance(old, dict):
            old = _as_json(_model_dict(old))
        if isinstance(old, dict) and isinstance(new, dict):
            keys = sorted(set(old) | set(new), key=lambda k: (k != "family", k))  # another family differs everywhere
            yield from ((f"{section}.{k}", old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k))
        elif old != new:
            yield section, old, new
    old_train, new_train = previous.get("train", {}), record["train"]
    for key in sorted(set(old_train) | set(new_train)):
        if key not in RESUMABLE_CHANGES and old_train.get(key) != new_train.get(key):
            default = getattr(TrainConfig(), key, None)  # a key added since the run started: its default is what ran
            if key not in old_train and new_train.get(key) == default:
                continue
            yield f"train.{key}", old_train.get(key), new_train.get(key)


def _model_dict(recorded: dict) -> dict:
    """A recorded model config as this version writes it: keys added since then take the defaults that ran."""
    try:
        return configs.config_from_dict(recorded).to_dict()
    except UserError:  # not a config this version can build: compare it as written
        return {"family": configs.FIRST_FAMILY, **recorded}


def _as_json(value):
    return json.loads(json.dumps(value))


def write_run_files(run: Run, primary: bool) -> None:
    """model.json and tokenizer.json, then run.json: its presence says the other two are complete."""
    if not primary:
        return
    os.makedirs(run.workdir, exist_ok=True)
    modeldir.save_config(run.workdir, run.model_config)
    run.tokenizer.save(run.workdir)
    ckpt.write_run_file(run.workdir, run.record)


def checkpoint_meta(step: int, run: Run) -> dict:
    # The batch for step s is a pure function of (seed, s, process): the step *is* the data position.
    return {"step": step, "data": run.record["data"], "data_hash": run.record["data_hash"],
            "seed": run.train_config.seed, "tokens_seen": step * run.train_config.batch_size * run.train_config.seq_len}


def check_checkpoint_meta(meta: dict, run: Run, directory: str) -> None:
    """A restored checkpoint must be this run's, at the step its directory names."""
    expected = checkpoint_meta(run.resume_step, run)
    for key in ("step", "seed", "data_hash"):
        if meta.get(key, expected[key]) != expected[key]:
            raise UserError(f"checkpoint {directory}/{run.resume_step} says {key}={meta.get(key)!r} but this run has "
                            f"{expected[key]!r}: it belongs to another run; move it away or use a new --workdir")
