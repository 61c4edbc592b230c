"""The training loop: resolve and validate everything, then dispatch steps without waiting on the device.

`prepare()` reads configs, data, tokenizer and any existing workdir and raises a one-line `UserError` on
anything wrong *before* a single file is written; `train()` then runs. The loop dispatches step n, queues
the host→device copy of batch n+1, and only then fetches step n-1's metrics, so the device never idles on
the host. Checkpoints are async orbax saves; SIGTERM/SIGINT save and exit; a streak of non-finite steps halts
without touching the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import sys
import time
from typing import Any

import jax

from aigc_jax import configs, data, modeldir, parallel
from aigc_jax import tokenizers as tok
from aigc_jax.errors import UserError
from aigc_jax.model import flops_per_token, init_params
from aigc_jax.train import checkpoint as ckpt
from aigc_jax.train import optimizer as optim
from aigc_jax.train.config import RESUMABLE_CHANGES, TrainConfig
from aigc_jax.train.metrics import MetricsWriter, eval_summary, peak_flops_per_device
from aigc_jax.train.step import TrainState, eval_step, init_state, train_step


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


def prepare(
    workdir: str,
    model_config: configs.ModelConfig,
    train_config: TrainConfig,
    data_source: str = "default",
    data_dir: str | None = None,
    tokenizer_spec: str = "byte",
    init_from: str | None = None,
    dataset: data.TokenData | None = None,
    runtime_overrides: dict | None = None,
) -> Run:
    """Validates the run against data, devices and an existing workdir. Writes nothing.

    `dataset`: tokens already loaded (e.g. tokenized by a script on a machine without tensorflow-datasets); it is
    used instead of loading `data_source`, which then only names the data in run.json. `runtime_overrides` (with
    `init_from`): the runtime keys the user set; the others keep the source model's values. Without it, they
    come from `model_config`."""
    init = None
    if init_from:
        src_config, init, tokenizer = modeldir.load_any(init_from)
        if tokenizer is None:
            raise UserError(f"{init_from} has no tokenizer files; fine-tuning needs the tokenizer the model was trained with")
        # Shapes come from the source model; only runtime knobs may differ.
        keys = ("dropout", "attn_dropout", "dtype", "attention", "scan_layers", "remat")
        if runtime_overrides is None:
            model_config = src_config.replace(**{k: getattr(model_config, k) for k in keys})
        else:
            model_config = configs.with_overrides(src_config, {k: v for k, v in runtime_overrides.items()
                                                               if k in keys}, "model.")
        tokenizer_spec = f"from:{init_from}"
    else:
        tokenizer = _make_tokenizer(tokenizer_spec, data_source, data_dir)
        model_config = model_config.replace(vocab_size=tokenizer.vocab_size)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.vocab_size} ids but the model only {model_config.vocab_size}")

    seq_len = train_config.seq_len or model_config.n_positions
    if seq_len > model_config.n_positions:
        raise UserError(f"--seq-len {seq_len} exceeds the model's context n_positions={model_config.n_positions}")
    train_config = dataclasses.replace(train_config, seq_len=seq_len)
    n_dev = jax.device_count()
    if train_config.batch_size % (n_dev * train_config.grad_accum):
        raise UserError(f"--batch-size {train_config.batch_size} must be divisible by devices × grad_accum = "
                        f"{n_dev} × {train_config.grad_accum}")

    _check_workdir(workdir)
    if dataset is None:
        dataset = data.load(data_source, tokenizer, data_dir=data_dir)
    # Too little text for one window (train or validation) must fail here, not in train() after the run files exist.
    data.Batches(dataset.train, seq_len, train_config.batch_size, train_config.seed,
                 shift_windows=train_config.shift_windows)
    data.num_eval_batches(dataset.validation, seq_len, train_config.batch_size // train_config.grad_accum)
    record = {
        "model": model_config.to_dict(),
        "train": train_config.to_dict(),
        "data": data_source,
        "tokenizer": tokenizer_spec,
        "init_from": os.path.abspath(init_from) if init_from else None,
    }
    resume_step = None
    previous = ckpt.read_run_file(workdir)
    if previous is not None:
        _check_same_run(workdir, previous, record)
        resume_step = ckpt.latest_step(workdir)
    elif os.path.isdir(workdir) and os.listdir(workdir):
        raise UserError(f"--workdir {workdir} is not empty and holds no aigc_jax run; choose a new or empty directory")
    return Run(workdir, model_config, train_config, tokenizer, dataset, record, init, resume_step)


def _check_workdir(workdir: str) -> None:
    """A workdir that is (or lies under) a file, or whose checkpoints/ is a file, cannot hold a run."""
    modeldir.check_output_dir(workdir, "--workdir")
    checkpoints = os.path.join(workdir, ckpt.CHECKPOINTS)
    if os.path.exists(checkpoints) and not os.path.isdir(checkpoints):
        raise UserError(f"--workdir {workdir}: {checkpoints} is a file where the checkpoint directory belongs; "
                        "move it away or use a new --workdir")


def _make_tokenizer(spec: str, data_source: str, data_dir: str | None) -> tok.Tokenizer:
    if spec == "byte":
        return tok.byte_level()
    if spec == "char":
        return tok.char_level(data.load_text(data_source, data_dir=data_dir, split="train"))
    if spec.startswith("bpe:"):
        try:
            size = int(spec[4:])
        except ValueError:
            raise UserError(f"--tokenizer {spec}: expected bpe:VOCAB_SIZE, e.g. bpe:8192") from None
        return tok.train_bpe([data.load_text(data_source, data_dir=data_dir, split="train")], size)
    if os.path.isdir(spec):
        return tok.load(spec)
    raise UserError(f"--tokenizer must be byte, char, bpe:N or a directory with tokenizer files; got {spec!r}")


def _check_same_run(workdir: str, previous: dict, record: dict) -> None:
    for section in ("model", "data", "tokenizer", "init_from"):
        if previous.get(section) != record[section]:
            old, new = previous.get(section), record[section]
            if isinstance(old, dict) and isinstance(new, dict):
                key = next(k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
                section, old, new = f"{section}.{key}", old.get(key), new.get(key)
            raise UserError(f"--workdir {workdir} holds a run with {section}={old!r}, this command has {new!r}; "
                            "re-run with the original settings or use a new --workdir")
    old_train, new_train = previous.get("train", {}), record["train"]
    for key in sorted(set(old_train) | set(new_train)):
        if key not in RESUMABLE_CHANGES and old_train.get(key) != new_train.get(key):
            raise UserError(f"--workdir {workdir} holds a run with train.{key}={old_train.get(key)!r}, this command "
                            f"has {new_train.get(key)!r}; re-run with the original settings or use a new --workdir")


# ---------------------------------------------------------------------------------------------------------


def train(run: Run, log=print) -> dict:
    """Runs (or resumes) training; returns the final metrics. Raises TrainingHalted on a non-finite streak."""
    cfg, mcfg = run.train_config, run.model_config
    primary = jax.process_index() == 0
    mesh = parallel.make_mesh()
    if jax.process_count() > 1:
        # Every process has prepared (and so read the workdir) before the primary writes to it.
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("aigc_jax:prepared")

    optimizer = optim.make(cfg)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    make_state = functools.partial(_initial_state, run=run, optimizer=optimizer)
    checkpoints = ckpt.Checkpoints(run.workdir, cfg.keep_checkpoints)
    start = run.resume_step or 0
    if run.resume_step is not None:
        abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                                jax.eval_shape(make_state))
        state, _ = checkpoints.restore(run.resume_step, abstract)
        log(f"resumed from {checkpoints.directory}/{run.resume_step}")
    else:
        state = jax.jit(make_state, out_shardings=replicated)()
    _write_run_files(run, primary)  # only now: a checkpoint that fails to restore leaves the workdir as it was

    step_fn = parallel.wrap(
        functools.partial(train_step, model_config=mcfg, train_config=cfg, optimizer=optimizer),
        cfg.parallel, mesh, ("rep", "data"), ("rep", "rep"), donate_argnums=(0,),
    )
    sampler = data.Batches(run.data.train, cfg.seq_len, cfg.batch_size, cfg.seed,
                           jax.process_index(), jax.process_count(), cfg.shift_windows)
    place = lambda step: parallel.shard_batch(sampler.batch(step), cfg.parallel, mesh)
    evaluate = functools.partial(_evaluate, run=run, mesh=mesh, max_batches=cfg.eval_batches)
    writer = MetricsWriter(run.workdir, enabled=primary)
    flops = flops_per_token(mcfg, cfg.seq_len)
    peak = peak_flops_per_device(cfg.mfu_peak_tflops)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    stop = _StopFlag()
    bar = _progress(cfg, start, primary)

    last: dict = {}
    saved = run.resume_step  # the step of the newest checkpoint on disk (or being written)
    pending = None  # (step, device metrics) of the step dispatched before the current one
    t_prev = time.perf_counter()
    batch = place(start) if start < cfg.steps else None
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
                writer.write(done, "eval", evaluate(state.params))
            if cfg.sample_every and done % cfg.sample_every == 0 and done < cfg.steps:
                _log_samples(run, state.params, done, writer, log)
            if stop.signum:
                break
        if pending is not None:
            last = _record(pending, t_prev, tokens_per_step, flops, peak, cfg, writer, bar)
        final_step = pending[0] if pending else start
        if final_step != saved:
            checkpoints.save(final_step, state, _meta(final_step, run))
        checkpoints.wait()
        if stop.signum:
            log(f"stopped by signal {stop.signum} at step {final_step}; checkpoint saved. "
                "Re-run the same command to continue.")
            sys.exit(128 + stop.signum)
        result = {"step": final_step, **{k: last[k] for k in ("loss",) if k in last}}
        if final_step > start or cfg.eval_every:
            result.update({f"val_{k}": v for k, v in evaluate(state.params).items()})
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


def _initial_state(run: Run, optimizer) -> TrainState:
    params = run.init_params
    if params is None:
        params = init_params(run.model_config, jax.random.key(run.train_config.seed))
    return init_state(params, optimizer, run.train_config.seed)


def _write_run_files(run: Run, primary: bool) -> None:
    if not primary:
        return
    os.makedirs(run.workdir, exist_ok=True)
    modeldir.save_config(run.workdir, run.model_config)
    run.tokenizer.save(run.workdir)
    ckpt.write_run_file(run.workdir, run.record)


def _meta(step: int, run: Run) -> dict:
    # The batch for step s is a pure function of (seed, s, process): the step *is* the data position.
    return {"step": step, "data": run.record["data"], "seed": run.train_config.seed,
            "tokens_seen": step * run.train_config.batch_size * run.train_config.seq_len}


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
        bar.update(1)
        bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
    return values


def _evaluate(params, run: Run, mesh, max_batches: int = 0) -> dict:
    """Validation loss, perplexity and bits per byte over a fixed pass (the first `max_batches`, 0 = all).

    Batches are training micro-batches (batch_size / grad_accum rows): a recipe that accumulates gradients to fit
    in memory would not fit a whole batch's logits at once."""
    cfg = run.train_config
    fn = _eval_fn(run.model_config, cfg.parallel, mesh)
    nll, count = 0.0, 0.0
    batches = data.eval_batches(run.data.validation, cfg.seq_len, cfg.batch_size // cfg.grad_accum,
                                jax.process_index(), jax.process_count())
    for i, rows in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        out = jax.device_get(fn(params, parallel.shard_batch(rows, cfg.parallel, mesh)))
        nll, count = nll + float(out["nll"]), count + float(out["tokens"])
    return eval_summary(nll, count, run.data.bytes_per_token)


@functools.lru_cache(maxsize=8)
def _eval_fn(model_config, mode, mesh):
    return parallel.wrap(functools.partial(eval_step, model_config=model_config), mode, mesh,
                         ("rep", "data"), "rep")


def _log_samples(run: Run, params, step: int, writer, log) -> None:
    """A couple of sampled continuations of an end-of-text prompt, written to metrics.jsonl and the log."""
    from aigc_jax.api import LM

    lm = LM(run.model_config, params, run.tokenizer)
    n_new = min(128, run.model_config.n_positions - 16)
    texts = [lm.generate(run.tokenizer.eot_token, max_new_tokens=n_new, temperature=0.8, top_k=40, seed=step + i)
             for i in range(2)]
    for i, text in enumerate(texts):
        writer.write(step, "sample", {"index": i, "text": text})
        log(f"--- sample {i} at step {step} ---\n{text}")


def _progress(cfg: TrainConfig, start: int, primary: bool):
    if not (cfg.progress and primary):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)


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
                     parallel_mode: str | None = None) -> dict:
    """`aigc-jax eval`: loss, perplexity, bits per byte and token count of the latest checkpoint on a split."""
    record = ckpt.read_run_file(workdir)
    if record is None:
        raise UserError(f"{workdir} is not a training workdir ({ckpt.RUN_FILE} is missing)")
    if split not in ("train", "validation"):
        raise UserError(f"--split must be train or validation, got {split!r}")
    config, params, tokenizer = ckpt.load_inference(workdir)
    train_cfg = TrainConfig.from_dict(record["train"])
    if batch_size:
        train_cfg = dataclasses.replace(train_cfg, batch_size=batch_size)
    if parallel_mode:
        train_cfg = dataclasses.replace(train_cfg, parallel=parallel_mode)
    if train_cfg.batch_size % jax.device_count():
        raise UserError(f"--batch-size {train_cfg.batch_size} must be divisible by {jax.device_count()} devices")
    dataset = data.load(data_source or record["data"], tokenizer, data_dir=data_dir)
    if split == "train":
        dataset = dataclasses.replace(dataset, validation=dataset.train)
    run = Run(workdir, config, train_cfg, tokenizer, dataset, record)
    mesh = parallel.make_mesh()
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return _evaluate(params, run, mesh, max_batches)
