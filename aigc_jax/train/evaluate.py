"""Validation of a training run: the estimate taken every `eval_every` steps, the complete pass at the end, and
`aigc-jax eval --workdir` (the latest checkpoint on a split)."""

from __future__ import annotations

import dataclasses

import jax

from aigc_jax import checkpoints as ckpt
from aigc_jax import data, modeldir
from aigc_jax import tokenizers as tok
from aigc_jax.errors import UserError
from aigc_jax.model import init_params
from aigc_jax.train import progress
from aigc_jax.train.config import TrainConfig
from aigc_jax.train.layout import Layout
from aigc_jax.train.metrics import eval_summary
from aigc_jax.train.prepare import Run


def periodic(params, run: Run) -> dict:
    """An estimate from `eval_batches` batches, the same windows at every eval (so estimates compare)."""
    return evaluate(params, run, run.train_config.eval_batches)


def final(params, run: Run) -> dict:
    """The final figure: a complete pass over the validation split, never an estimate; its progress shows on the
    primary host only (as a bar in a terminal, else as plain lines)."""
    primary = jax.process_index() == 0
    shown = primary and progress.wants_bar(run.train_config.progress)
    return evaluate(params, run, 0, "final validation" if primary else None, shown)


def evaluate(params, run: Run, max_batches: int = 0, shown_as: str | None = None, bar: bool = False) -> dict:
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
    return evaluate(params, run, max_batches, shown_as, progress.wants_bar(True))
