"""The training loop: resolve and validate everything, then dispatch steps without waiting on the device.

`prepare()` reads configs, data, tokenizer and any existing workdir and raises a one-line `UserError` on
anything wrong *before* a single file is written; `train()` then runs. A fresh start writes the run files
(model.json, tokenizer.json, then run.json last) before anything else, so a run killed at any instant is
re-run by the same command: it resumes, or (killed before run.json landed) starts cleanly over its own files.
The loop dispatches step n, queues the host→device copy of batch n+1, and only then fetches step n-1's metrics,
so the device never idles on the host. Checkpoints are async orbax saves; SIGTERM/SIGINT save and exit; a streak
of non-finite steps halts without touching the last good checkpoint.

Resume is checked, not trusted: run.json records the model config, the data source *and a hash of its token
stream*, the tokenizer spec *and its hash*, and the fine-tuning source; a re-run that differs in any of them
(other than the keys in RESUMABLE_CHANGES) is a one-line error naming both values, and the flag that set it when
the caller says (`explicit`: the CLI fills what was not given from run.json, so only a given flag can differ).
A resumed run reads its tokenizer and model config from the workdir, never from the corpus or the `--init-from`
source again.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from typing import Any

import jax
import numpy as np

from aigc_jax import checkpoints as ckpt
from aigc_jax import configs, data, fileio, modeldir, sharding
from aigc_jax import tokenizers as tok
from aigc_jax.decode import GenerationConfig, Generator
from aigc_jax.errors import UserError
from aigc_jax.model import flops_per_token, init_params
from aigc_jax.prompts import Prompter
from aigc_jax.train import optimizer as optim
from aigc_jax.train import progress
from aigc_jax.train.config import RESUMABLE_CHANGES, TrainConfig
from aigc_jax.train.metrics import MetricsWriter, check_tracking, eval_summary, peak_flops_per_device
from aigc_jax.train.layout import Layout, memory_plan

# What a fresh start writes before run.json: a workdir holding only these (and temporary files) was killed
# mid-start and may be started over.
_START_FILES = (modeldir.MODEL_FILE, tok.FILE, "metrics.jsonl", "tb")


class TrainingHalted(UserError):
    """Too many consecutive non-finite steps; the last good checkpoint is left as it was."""


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

    check_tracking(train_config.wandb_project)
    seq_len = train_config.seq_len or model_config.n_positions
    if seq_len > model_config.n_positions:
        raise UserError(f"--seq-len {seq_len} exceeds the model's context n_positions={model_config.n_positions}")
    train_config = dataclasses.replace(train_config, seq_len=seq_len)
    n_dev = jax.device_count()
    layout = Layout.resolve(train_config, model_config)

    record = {
        "model": model_config.to_dict(),
        "train": train_config.to_dict(),
        "data": data_source,
        "data_hash": None,  # below, once the data is loaded
        "data_dir": os.path.abspath(data_dir) if data_dir else None,  # where its token cache is: not compared
        "tokenizer": tokenizer_spec,
        "tokenizer_hash": data.tokenizer_hash(tokenizer),
        "init_from": os.path.abspath(init_from) if init_from else None,
        # Informational (not compared on resume): what "auto" settings resolved to on the machine that started it.
        "runtime": {"dtype": configs.compute_dtype(model_config).name, "backend": jax.default_backend(),
                    "devices": n_dev},
    }
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


def _check_tokenizer(workdir: str, previous: dict, tokenizer: tok.Tokenizer, what: str) -> None:
    recorded, found = previous.get("tokenizer_hash"), data.tokenizer_hash(tokenizer)
    if recorded is not None and recorded != found:
        raise UserError(f"--workdir {workdir}: {what} is not the tokenizer the run started with (tokenizer_hash "
                        f"{found}, the run has {recorded}); restore it or use a new --workdir")


def _finetune_config(source: configs.ModelConfig, overrides: dict) -> configs.ModelConfig:
    """The source's config; only runtime keys may change (the architecture is what the weights are)."""
    architecture = sorted(k for k in overrides if k not in configs.RUNTIME_KEYS)
    if architecture:
        same = all(str(getattr(source, k, None)).lower() == str(overrides[k]).lower() for k in architecture)
        if not same:
            key = architecture[0]
            raise UserError(f"cannot change model.{key} of the model being fine-tuned (it is {getattr(source, key, None)!r}); "
                            f"only runtime keys may change: {', '.join(configs.RUNTIME_KEYS)}")
        overrides = {k: v for k, v in overrides.items() if k in configs.RUNTIME_KEYS}
    return configs.with_overrides(source, overrides, "model.") if overrides else source


def _settings_line(mcfg, tcfg: TrainConfig, init_from: str | None, overrides: dict) -> str:
    """The effective settings, said once at start: what a run trains is never a guess."""
    dtype = configs.compute_dtype(mcfg).name
    runtime = (f"dtype={dtype}{' (auto)' if mcfg.dtype == 'auto' else ''} param_dtype={mcfg.param_dtype} "
               f"dropout={mcfg.dropout} attn_dropout={mcfg.attn_dropout} attention={mcfg.attention} "
               f"remat={mcfg.remat} scan_layers={mcfg.scan_layers}")
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


# ---------------------------------------------------------------------------------------------------------


def train(run: Run, log=print) -> dict:
    """Runs (or resumes) training; returns the final metrics. Raises TrainingHalted on a non-finite streak."""
    cfg, mcfg = run.train_config, run.model_config
    primary = jax.process_index() == 0
    layout = run.layout
    if jax.process_count() > 1:
        # Every process has prepared (and so read the workdir) before the primary writes to it.
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("aigc_jax:prepared")

    for note in run.notes:
        log(note)
    optimizer = optim.make(cfg)
    start = run.resume_step or 0
    if run.resume_step is None:
        # A fresh start claims the workdir first: killed from here on, the same command starts over or resumes.
        _write_run_files(run, primary)
    checkpoints = ckpt.Checkpoints(run.workdir, cfg.keep_checkpoints)
    abstract, shardings = layout.abstract_state(optimizer, cfg.seed, mcfg)
    if run.resume_step is not None:
        # Restored onto this run's layout, whatever layout saved it (orbax reshards).
        state, meta = checkpoints.restore(run.resume_step, abstract)
        _check_meta(meta, run, checkpoints.directory)
        log(f"resumed from {checkpoints.directory}/{run.resume_step}")
        _write_run_files(run, primary)  # only now: a checkpoint that fails to restore leaves the workdir as it was
    else:
        state, _ = layout.initial_state(run.init_params, optimizer, cfg.seed, mcfg)

    step_fn = layout.train_step(shardings, model_config=mcfg, train_config=cfg, optimizer=optimizer)
    sampler = data.Batches(run.data.train, cfg.seq_len, cfg.batch_size, cfg.seed,
                           jax.process_index(), jax.process_count(), cfg.shift_windows)
    stop = _StopFlag()

    def place(step):
        rows = sampler.batch(step)
        # This host's stop request travels with its rows; the step reduces it over every host.
        rows["stop"] = np.full(len(rows["tokens"]), 1 if stop.signum else 0, np.int32)
        return layout.place(rows)

    evaluate = functools.partial(_evaluate, run=run, max_batches=cfg.eval_batches)
    batch = place(start) if start < cfg.steps else None
    if batch is not None:
        log("compiling the train step (seconds to minutes, once per shape; the compile cache keeps it)")
        _log_memory_plan(step_fn, state, batch, abstract, layout, log)
    writer = MetricsWriter(run.workdir, primary, cfg.wandb_project, cfg.wandb_mode, run.record)
    flops = flops_per_token(mcfg, cfg.seq_len)
    peak = peak_flops_per_device(cfg.mfu_peak_tflops)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = progress.Steps(cfg.steps, start, cfg.log_every, progress.wants_bar(cfg.progress)) if primary else None

    last: dict = {}
    saved = run.resume_step  # the step of the newest checkpoint on disk (or being written)
    pending = None  # (step, device metrics) of the step dispatched before the current one
    t_prev = time.perf_counter()
    step = start
    try:
        for step in range(start, cfg.steps):
            state, metrics = step_fn(state, batch)
            if step + 1 < cfg.steps:
                batch = place(step + 1)  # the copy overlaps with the step just dispatched
            if pending is not None:
                last = _record(pending, t_prev, tokens_per_step, flops, peak, cfg, writer, bar)
                t_prev = time.perf_counter()
            pending = (step + 1, metrics)
            done = step + 1
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                checkpoints.save(done, state, _meta(done, run))
                saved = done
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                estimate = evaluate(state.params)
                writer.write(done, "eval", estimate)
                if bar is not None:
                    bar.validation(estimate["loss"])
            if cfg.sample_every and done % cfg.sample_every == 0 and done < cfg.steps:
                _log_samples(run, state.params, done, writer, log)
            if last.get("stop"):  # some host was signalled: every host sees it at this same step and stops here
                break
        if pending is not None:
            last = _record(pending, t_prev, tokens_per_step, flops, peak, cfg, writer, bar)
        final_step = pending[0] if pending else start
        if final_step != saved:
            checkpoints.save(final_step, state, _meta(final_step, run))
        checkpoints.wait()
        if stop.signum or last.get("stop"):
            why = f"by signal {stop.signum}" if stop.signum else "because another process was signalled"
            log(f"stopped {why} at step {final_step}; checkpoint saved. Re-run the same command to continue.")
            sys.exit(128 + (stop.signum or signal.SIGTERM))
        result = {"step": final_step, **{k: last[k] for k in ("loss",) if k in last}}
        if final_step > start or cfg.eval_every:
            # The final figure is a complete pass over the validation split, never an estimate.
            shown = primary and progress.wants_bar(cfg.progress)  # else plain lines (on the primary host only)
            final = _evaluate(state.params, run, 0, "final validation" if primary else None, shown)
            result.update({f"val_{k}": v for k, v in final.items()})
            writer.write(final_step, "eval", {k[4:]: v for k, v in result.items() if k.startswith("val_")})
        if cfg.sample_every:
            _log_samples(run, state.params, final_step, writer, log)
        return result
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        checkpoints.close()
        writer.close()


def _log_memory_plan(step_fn, state, batch, abstract, layout: Layout, log) -> None:
    """Compiles the step for these inputs and logs the per-device memory it plans (what `aigc-jax info` predicts
    for this layout). jit keeps the executable, so the first step does not compile again; pmap has no such cache
    and is left to compile on its first call."""
    if layout.mode == "pmap":
        return
    plan = memory_plan(step_fn.lower(state, batch).compile(), abstract)
    log(f"{layout.mode} on mesh {layout.shape}: per device {sharding.human_bytes(plan['params_bytes'])} params + "
        f"{sharding.human_bytes(plan['optimizer_bytes'])} optimizer state; the step plans "
        + ", ".join(f"{k[5:-6]} {sharding.human_bytes(v)}" for k, v in plan.items() if k.startswith("step_")))


def _write_run_files(run: Run, primary: bool) -> None:
    """model.json and tokenizer.json, then run.json: its presence says the other two are complete."""
    if not primary:
        return
    os.makedirs(run.workdir, exist_ok=True)
    modeldir.save_config(run.workdir, run.model_config)
    run.tokenizer.save(run.workdir)
    ckpt.write_run_file(run.workdir, run.record)


def _meta(step: int, run: Run) -> dict:
    # The batch for step s is a pure function of (seed, s, process): the step *is* the data position.
    return {"step": step, "data": run.record["data"], "data_hash": run.record["data_hash"],
            "seed": run.train_config.seed, "tokens_seen": step * run.train_config.batch_size * run.train_config.seq_len}


def _check_meta(meta: dict, run: Run, directory: str) -> None:
    """A restored checkpoint must be this run's, at the step its directory names."""
    expected = _meta(run.resume_step, run)
    for key in ("step", "seed", "data_hash"):
        if meta.get(key, expected[key]) != expected[key]:
            raise UserError(f"checkpoint {directory}/{run.resume_step} says {key}={meta.get(key)!r} but this run has "
                            f"{expected[key]!r}: it belongs to another run; move it away or use a new --workdir")


def _record(pending, t_prev, tokens_per_step, flops, peak, cfg, writer, bar) -> dict:
    """Fetches a finished step's metrics (the next step is already queued), logs them, checks the guard."""
    step, metrics = pending
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    dt = time.perf_counter() - t_prev
    values["step_time"] = dt
    values["tokens_per_sec"] = tokens_per_step / dt
    if peak:
        values["mfu"] = values["tokens_per_sec"] * flops / (peak * jax.device_count())
    if values["skipped"]:
        writer.write(step, "nonfinite", {"loss": values["loss"], "grad_norm": values["grad_norm"],
                                         "streak": values["nonfinite_streak"]})
    if values["nonfinite_streak"] >= cfg.halt_after_nonfinite:
        raise TrainingHalted(f"halted at step {step}: {int(values['nonfinite_streak'])} non-finite steps in a row "
                             "(updates skipped); lower --lr or check the data. The last checkpoint is intact.")
    if step % cfg.log_every == 0 or step == cfg.steps:
        writer.write(step, "train", values)
    if bar is not None:
        bar.step(step, values)
    return values


def _evaluate(params, run: Run, max_batches: int = 0, shown_as: str | None = None, bar: bool = False) -> dict:
    """Validation loss, perplexity and bits per byte: a complete pass (max_batches=0), or an estimate of the
    whole split from `max_batches` batches of windows drawn across it with a fixed seed (the same at every eval).
    `tokens` says how many tokens the figure is over. `shown_as`: the name under which a complete pass (which can
    take minutes) shows its progress, as a bar or as plain lines.

    Batches are training micro-batches (batch_size / grad_accum rows): a recipe that accumulates gradients to fit
    in memory would not fit a whole batch's logits at once."""
    cfg, layout = run.train_config, run.layout
    fn = _eval_fn(run.model_config, layout, jax.tree.map(lambda x: x.sharding, params))
    nll, count = 0.0, 0.0
    rows_per_batch = cfg.batch_size // cfg.grad_accum
    batches = data.eval_batches(run.data.validation, cfg.seq_len, rows_per_batch, jax.process_index(),
                                jax.process_count(), max_batches=max_batches, seed=cfg.seed)
    total_rows = data.num_eval_rows(run.data.validation, cfg.seq_len)
    shown = progress.Tokens(shown_as, total_rows * cfg.seq_len, bar) if shown_as and not max_batches else None
    for i, rows in enumerate(batches):
        out = jax.device_get(fn(params, layout.place(rows)))
        nll, count = nll + float(out["nll"]), count + float(out["tokens"])
        if shown is not None:
            shown.update(min(rows_per_batch, total_rows - i * rows_per_batch) * cfg.seq_len)
    if shown is not None:
        shown.close()
    return eval_summary(nll, count, run.data.bytes_per_token)


_EVAL_FNS: dict = {}


def _eval_fn(model_config, layout: Layout, param_shardings):
    key = (model_config, layout, jax.tree.structure(param_shardings))
    if key not in _EVAL_FNS:
        _EVAL_FNS.clear()  # one run's at a time: executables hold on to their buffers
        _EVAL_FNS[key] = layout.eval_step(param_shardings, model_config)
    return _EVAL_FNS[key]


def _log_samples(run: Run, params, step: int, writer, log) -> None:
    """A couple of sampled continuations of an empty prompt, written to metrics.jsonl and the log. The prompt and
    the text come from the prompt path `generate` uses: a Llama tokenizer's BOS (GPT-2, which has none, starts from
    end-of-text), its EOS ids, the continuation decoded after the prompt."""
    prompts = Prompter(run.tokenizer)
    prompt = prompts.encode("") or [run.tokenizer.eot_id]
    n_new = min(128, run.model_config.n_positions - len(prompt) - 15)
    generator = Generator(run.model_config, params)
    for i in range(2):
        gen = GenerationConfig(max_new_tokens=n_new, temperature=0.8, top_k=40, seed=step + i,
                               eos_ids=prompts.stop_ids)
        (ids,) = generator.generate([prompt], gen)
        text = prompts.continuation(prompt, ids[:-1] if ids and ids[-1] in gen.eos_ids else ids)
        writer.write(step, "sample", {"index": i, "text": text})
        log(f"--- sample {i} at step {step} ---\n{text}")


class _StopFlag:
    """Turns the first SIGTERM/SIGINT into "save a checkpoint and exit" instead of dying mid-step."""

    def __init__(self):
        self.signum = 0
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        if self.signum:  # a second signal: give up immediately
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}


def evaluate_workdir(workdir: str, split: str = "validation", data_source: str | None = None,
                     data_dir: str | None = None, batch_size: int | None = None, max_batches: int = 0,
                     parallel_mode: str | None = None, mesh: str | None = None) -> dict:
    """`aigc-jax eval`: loss, perplexity, bits per byte and token count of the latest checkpoint on a split.

    Batches are the run's micro-batches (batch_size / grad_accum rows) unless `batch_size` says otherwise; the
    weights are restored straight onto the layout (`mesh`, default every device on data), whatever saved them."""
    record = ckpt.read_run_file(workdir)
    if record is None:
        raise UserError(f"{workdir} is not a training workdir ({ckpt.RUN_FILE} is missing)")
    if split not in ("train", "validation"):
        raise UserError(f"--split must be train or validation, got {split!r}")
    config = modeldir.load_config(workdir)
    train_cfg = TrainConfig.from_dict({**record["train"], "mesh": mesh or "", "parallel": parallel_mode or "auto"})
    if batch_size:
        train_cfg = dataclasses.replace(train_cfg, batch_size=batch_size, grad_accum=1)
    rows = train_cfg.batch_size // train_cfg.grad_accum
    if rows % jax.device_count() and train_cfg.parallel != "mesh" and not mesh:
        raise UserError(f"evaluation batches of {rows} rows do not split over {jax.device_count()} devices: "
                        f"pass --batch-size N with N a multiple of {jax.device_count()}")
    layout = Layout.resolve(train_cfg, config)
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    _, params, tokenizer = modeldir.load_workdir(workdir, sharding=layout.param_shardings(abstract, config))
    if tokenizer is None:
        raise UserError(f"{workdir} has no {tok.FILE}: it is not a complete training workdir")
    dataset = data.load(data_source or record["data"], tokenizer, data_dir=data_dir)
    if split == "train":
        dataset = dataclasses.replace(dataset, validation=dataset.train)
    run = Run(workdir, config, train_cfg, tokenizer, dataset, record, layout=layout)
    shown_as = f"{split} pass" if jax.process_index() == 0 else None
    return _evaluate(params, run, max_batches, shown_as, progress.wants_bar(True))
