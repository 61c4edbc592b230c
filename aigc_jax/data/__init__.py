"""Input pipeline: tfds corpora built without TensorFlow, tokenized once, served as step-indexed batches.

    data = aigc_jax.data.load("default", tokenizer)            # or a path, a .jsonl, tfds:NAME
    train = aigc_jax.data.Batches(data.train, seq_len=256, global_batch=64, seed=0,
                                  process_index=jax.process_index(), process_count=jax.process_count())
    batch = train.batch(step)                # {"tokens": int32 [B_local, T+1], "loss_mask": float32 [B_local, T]}
    for batch in aigc_jax.data.eval_batches(data.validation, 256, 64, process_index, process_count): ...
    bits_per_byte = mean_loss_nats / math.log(2) / data.bytes_per_token

`--data` sources (`sources.py`): `default` (the Python standard library's sources + pydoc topics, present on
any machine with Python), a text file / directory / glob, `PATH.jsonl` (prompt→completion examples), or
`tfds:NAME[/CONFIG][:VERSION]` (a stock tfds dataset prepared in array_record format in the data dir).
Datasets and token caches live in the data dir: `--data-dir`, else $AIGC_DATA_DIR, else
~/.cache/aigc_jax/datasets:

    local_text/<fingerprint>/1.0.0/, python_stdlib/<py version + hash>/1.0.0/   tfds array_record datasets
    NAME[/CONFIG]/VERSION/                          stock tfds datasets you prepared (`tfds build …`)
    tokens-v1/<source key>/<tokenizer hash>/        {train,validation}.bin + meta.json, memory-mapped

Batches are process-local rows; `aigc_jax.parallel.shard_batch` places them on devices.

Importing this package never imports tensorflow_datasets: only building a dataset does (`builders.py`),
so batches over a cached stream work on a machine without tfds.
"""

from __future__ import annotations

import argparse

from aigc_jax.data.batches import Batches, eval_batches, num_eval_batches, num_eval_rows
from aigc_jax.data.corpus import TokenData, load, load_text, tokenizer_hash
from aigc_jax.data.examples import Examples
from aigc_jax.data.sources import default_data_dir

__all__ = ["Batches", "Examples", "TokenData", "add_data_args", "default_data_dir", "eval_batches", "load",
           "load_text", "num_eval_batches", "num_eval_rows", "tokenizer_hash"]


def add_data_args(parser: argparse.ArgumentParser, default: str | None = "default") -> None:
    """--data / --data-dir, shared by the commands that read a corpus. `default=None` lets a command tell an
    explicit --data from none (--help still shows "default")."""
    parser.add_argument(
        "--data", default=default, metavar="SRC",
        help="default (Python stdlib sources + pydoc topics, offline) | PATH (text file, directory or glob) | "
             "PATH.jsonl (prompt/completion examples) | tfds:NAME[/CONFIG][:VERSION] (prepared in --data-dir) "
             "(default: default)",
    )
    parser.add_argument(
        "--data-dir", default=None, metavar="DIR",
        help="where datasets and token caches live (default: $AIGC_DATA_DIR or ~/.cache/aigc_jax/datasets)",
    )
