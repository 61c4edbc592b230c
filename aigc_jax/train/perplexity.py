"""`aigc-jax eval --model SRC --data TEXT`: loss, perplexity and bits per byte of any model on a whole text.

The text (`default`, a file, a directory or a glob, as `--data` of train) is tokenized with the model's own
tokenizer the way training data is: every document followed by the end-of-text id, no BOS, special-token strings in
the text read as plain text; a single file is one document (train/validation splits play no part here).

Windows: the model's context T (or --seq-len) decides them. Window i is tokens[i*T : i*T + T + 1] (stride T, no
overlap), so every token but the first is predicted exactly once, with the context since its window began (between
0 and T-1 tokens, T/2 on average: lower than a sliding window's context, so the loss is a little higher, as in
HF's perplexity guide with stride = context). The tokens after the last whole window are scored by one more window,
the text's last T + 1 tokens, counting only those not scored yet; a text shorter than the context is one window.
The loss is computed by the training code's own eval step (train/step.py) on the layout train uses.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np

from aigc_jax import model, modeldir
from aigc_jax.data import eval_batches, num_eval_batches, sources
from aigc_jax.data.corpus import encode_documents
from aigc_jax.errors import UserError
from aigc_jax.train.config import TrainConfig
from aigc_jax.train.layout import Layout
from aigc_jax.train.metrics import eval_summary

DEFAULT_ROWS = 8  # windows per batch (rounded up to the device count)


def evaluate_text(src: str, data: str = "default", data_dir: str | None = None, seq_len: int = 0,
                  batch_size: int = 0, parallel: str = "auto", mesh: str = "", progress: bool = True) -> dict:
    """{"loss", "perplexity", "bits_per_byte", "tokens", "seq_len", "model", "data"} of model `src` (a model
    dir, training workdir or HF dir) on the whole of text `data`; `parallel`/`mesh` as train's (a mesh with fsdp
    or tensor axes shards the weights as training would)."""
    config, params, tokenizer = modeldir.load_any(src)
    if tokenizer is None:
        raise UserError(f"{src} has no tokenizer (tokenizer.json or vocab.json + merges.txt): eval tokenizes "
                        "--data with the model's own tokenizer")
    if not 0 <= seq_len <= config.n_positions:
        raise UserError(f"--seq-len must be between 1 and the model's context of {config.n_positions}, got {seq_len}")
    tokens, n_bytes = text_tokens(data, tokenizer, data_dir)
    if len(tokens) < 2:
        raise UserError(f"--data {data} has {len(tokens)} token(s): at least 2 are needed to predict one")
    T = min(seq_len or config.n_positions, len(tokens) - 1)
    rows = -(-(batch_size or DEFAULT_ROWS) // jax.device_count()) * jax.device_count()
    layout = Layout.resolve(TrainConfig(batch_size=rows, seq_len=T, parallel=parallel, mesh=mesh), config)
    abstract = jax.eval_shape(lambda: model.init_params(config, jax.random.key(0)))
    shardings = layout.param_shardings(abstract, config)
    params = jax.device_put(model.match_layout(params, config), shardings)
    step = layout.eval_step(shardings, config)
    nll = count = 0.0
    total = num_eval_batches(tokens, T, rows) + ((len(tokens) - 1) % T > 0)
    for batch in _report(_batches(tokens, T, rows), total, progress):
        out = jax.device_get(step(params, layout.place(batch)))
        nll, count = nll + float(out["nll"]), count + float(out["tokens"])
    summary = eval_summary(nll, count, n_bytes / len(tokens))
    return {**summary, "seq_len": T, "model": src, "data": data}


def text_tokens(data: str, tokenizer, data_dir: str | None = None) -> tuple[np.ndarray, int]:
    """(token ids of every document of `data`, each followed by end-of-text; the documents' UTF-8 bytes)."""
    explicit = data_dir is not None
    source = sources.parse(data, Path(data_dir) if explicit else sources.default_data_dir(), explicit)
    if source.kind not in ("default", "local_text"):
        raise UserError(f"eval --model reads plain text (default, a file, a directory or a glob), not {data}: "
                        "evaluate a training workdir with --workdir for prompt/completion or tfds data")
    texts = [read() for _, read in sources.all_documents(source)]
    pieces = list(encode_documents(texts, tokenizer))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    return tokens.astype(np.int32), sum(len(t.encode("utf-8")) for t in texts)


def _batches(tokens: np.ndarray, T: int, rows: int) -> Iterator[dict]:
    """The whole windows in order (data.eval_batches), then the tail window (see the module docstring)."""
    yield from eval_batches(tokens, T, rows)
    tail = (len(tokens) - 1) % T
    if tail:
        batch = {"tokens": np.zeros((rows, T + 1), np.int32), "loss_mask": np.zeros((rows, T), np.float32)}
        batch["tokens"][0] = tokens[-(T + 1):]
        batch["loss_mask"][0, T - tail:] = 1.0
        yield batch


def _report(batches: Iterator[dict], total: int, progress: bool) -> Iterator[dict]:
    """A tqdm bar on a terminal; elsewhere (logs, pipes) a plain line at every quarter."""
    if not progress:
        yield from batches
        return
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        yield from tqdm(batches, total=total, desc="eval", unit="batch", file=sys.stderr, leave=False)
        return
    marks = {max(1, round(total * q / 4)) for q in range(1, 5)}
    for i, batch in enumerate(batches, 1):
        yield batch
        if i in marks:
            print(f"eval: {i}/{total} batches", file=sys.stderr, flush=True)
