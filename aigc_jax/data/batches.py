"""Step-indexed batches: the batch for step s is a pure function of (seed, s, process_index, process_count).

Rows. Text: window i is tokens[i*T : i*T + T + 1] (stride T, so every token but the first is a target
exactly once; windows span document boundaries, with EOT between documents, as in GPT-2). Examples: row i
is example i, right-padded with zeros to T + 1.

With `shift_windows`, epoch e > 0 moves every window a seeded 0..T-1 tokens later (see `_Windows`).

Order. Global sample g = s * global_batch + j (j < global_batch) is row perm_e[g mod n] of epoch
e = g div n, where perm_e is a seeded permutation of the n rows: no row repeats within an epoch, and
resuming at step s needs no iterator state. Process p takes the contiguous slice
j in [p * local_batch, (p + 1) * local_batch), so processes are disjoint and together form the global batch.

Each batch is {"tokens": int32 [local_batch, T + 1], "loss_mask": float32 [local_batch, T]}, where
loss_mask[b, t] weights the prediction of tokens[b, t + 1] from tokens[b, : t + 1].
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator

import numpy as np

from aigc_jax.data.examples import Examples
from aigc_jax.errors import UserError

Batch = dict[str, np.ndarray]


class _Windows:
    """Windows over a flat token stream (a memmap stays a memmap: only gathered rows are read).

    With `shift`, epoch e's windows all start `shift_e` tokens later (shift_0 = 0, then a seeded draw in
    [0, T)): still no window repeats within an epoch, but a many-epoch run sees new alignments of the text
    instead of the same n sequences every time. One window per epoch is given up to make room for the shift.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, split: str, shift: bool = False):
        if len(tokens) < seq_len + 1:
            raise UserError(f"the {split} split has {len(tokens):,} tokens, fewer than one window of seq_len + 1 = "
                            f"{seq_len + 1:,}: use a smaller --seq-len or more text")
        self.shift = shift and len(tokens) >= 2 * seq_len + 1  # room for at least one shifted window
        self.n = (len(tokens) - 1 - (seq_len - 1 if self.shift else 0)) // seq_len
        self._tokens, self._T = tokens, seq_len

    def rows(self, idx: np.ndarray, shift: np.ndarray | int = 0) -> Batch:
        starts = np.asarray(idx, np.int64) * self._T + shift
        tokens = self._tokens[starts[:, None] + np.arange(self._T + 1)].astype(np.int32)
        return {"tokens": tokens, "loss_mask": np.ones(tokens[:, 1:].shape, np.float32)}


class _Padded:
    """One prompt→completion example per row, truncated to T + 1 tokens, loss on the completion + EOT only."""

    def __init__(self, data: Examples, seq_len: int, split: str):
        if not len(data):
            raise UserError(f"the {split} split has no examples")
        self.n, self._data, self._len = len(data), data, seq_len + 1
        lengths, prompts = data.lengths, data.prompt_lens
        if (prompts >= self._len).any():
            raise UserError(f"{int((prompts >= self._len).sum())} {split} examples have prompts of at least "
                            f"seq_len + 1 = {self._len} tokens, leaving no completion to train on: raise --seq-len")
        if (lengths > self._len).any():
            warnings.warn(f"{int((lengths > self._len).sum())} of {self.n} {split} examples are longer than "
                          f"seq_len + 1 = {self._len} tokens; their completions are truncated", stacklevel=3)

    def rows(self, idx: np.ndarray, shift=0) -> Batch:
        tokens = np.zeros((len(idx), self._len), np.int32)
        mask = np.zeros((len(idx), self._len - 1), np.float32)
        for b, i in enumerate(idx):
            seq = self._data[i][: self._len]
            tokens[b, : len(seq)] = seq
            # Position t predicts token t + 1: the completion starts at token prompt_len.
            mask[b, max(int(self._data.prompt_lens[i]) - 1, 0) : len(seq) - 1] = 1.0
        return {"tokens": tokens, "loss_mask": mask}


def _rows(data: np.ndarray | Examples, seq_len: int, split: str, shift: bool = False):
    if seq_len < 1:
        raise UserError(f"seq_len must be >= 1, got {seq_len}")
    if isinstance(data, Examples):
        return _Padded(data, seq_len, split)
    return _Windows(np.asarray(data), seq_len, split, shift)


def _local_slice(global_batch: int, process_index: int, process_count: int) -> tuple[int, int]:
    if global_batch < 1 or process_count < 1 or not 0 <= process_index < process_count:
        raise UserError(f"bad batch layout: global_batch={global_batch}, process {process_index} of {process_count}")
    if global_batch % process_count:
        raise UserError(f"global batch {global_batch} does not split evenly over {process_count} processes")
    local = global_batch // process_count
    return process_index * local, local


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """A seeded permutation of n rows; epoch -1 is the validation sample's (a stream no training epoch uses)."""
    # Built from the bit generator's raw stream (which NumPy keeps stable across releases) rather than
    # Generator.permutation (whose algorithm may change), so a resumed run gets the same order after upgrades.
    keys = np.random.PCG64(np.random.SeedSequence([seed, epoch] if epoch >= 0 else [seed, 0, 2])).random_raw(n)
    return np.argsort(keys, kind="stable")


@functools.lru_cache(maxsize=64)
def _epoch_shift(seed: int, epoch: int, seq_len: int) -> int:
    # A separate stream from the permutation's (the extra 1 in the seed sequence); epoch 0 is never shifted.
    return 0 if epoch == 0 else int(np.random.PCG64(np.random.SeedSequence([seed, epoch, 1])).random_raw() % seq_len)


class Batches:
    """Training batches for any step (see the module docstring for the exact order)."""

    def __init__(self, data: np.ndarray | Examples, seq_len: int, global_batch: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, shift_windows: bool = False):
        if seed < 0:
            raise UserError(f"seed must be >= 0, got {seed}")
        self._rows = _rows(data, seq_len, "train", shift_windows)
        self._offset, self.local_batch = _local_slice(global_batch, process_index, process_count)
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed
        self.num_rows = self._rows.n  # windows (text) or examples (JSONL) per epoch
        self.steps_per_epoch = self.num_rows // global_batch  # full global batches per epoch (may be 0)

    def epoch(self, step: int) -> float:
        """Epochs completed at the start of `step` (fractional)."""
        return step * self.global_batch / self.num_rows

    def indices(self, step: int) -> np.ndarray:
        """The rows this process reads at `step`."""
        return self._indices(step)[0]

    def _indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, the epoch of each row) this process reads at `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        g = step * self.global_batch + self._offset + np.arange(self.local_batch, dtype=np.int64)
        epochs, positions = np.divmod(g, self.num_rows)
        idx = np.empty_like(g)
        for e in np.unique(epochs):  # a batch spans at most a few epochs (more only when n < global_batch)
            at = epochs == e
            idx[at] = _permutation(self.seed, int(e), self.num_rows)[positions[at]]
        return idx, epochs

    def batch(self, step: int) -> Batch:
        idx, epochs = self._indices(step)
        shifts = 0
        if getattr(self._rows, "shift", False):
            shifts = np.array([_epoch_shift(self.seed, int(e), self.seq_len) for e in epochs], np.int64)
        return self._rows.rows(idx, shifts)


def eval_batches(data: np.ndarray | Examples, seq_len: int, global_batch: int, process_index: int = 0,
                 process_count: int = 1, max_batches: int = 0, seed: int = 0) -> Iterator[Batch]:
    """Validation batches: one complete pass over the rows in order (max_batches = 0, or at least the pass length),
    else `max_batches` batches of rows drawn without replacement from the whole split by `seed` (in split order;
    the same rows at every call, so periodic estimates are comparable and unbiased for the whole split).
    Every process gets the same number of batches, the last padded with loss_mask = 0 rows, so each chosen row
    counts exactly once across all processes."""
    rows = _rows(data, seq_len, "validation")
    offset, local = _local_slice(global_batch, process_index, process_count)
    order = np.arange(rows.n, dtype=np.int64)
    if max_batches and max_batches * global_batch < rows.n:
        order = np.sort(_permutation(seed, -1, rows.n)[: max_batches * global_batch])
    for start in range(0, len(order), global_batch):
        at = start + offset + np.arange(local, dtype=np.int64)
        real = at < len(order)
        batch = rows.rows(order[np.where(real, at, 0)])
        batch["loss_mask"][~real] = 0.0
        batch["tokens"][~real] = 0
        yield batch


def num_eval_batches(data: np.ndarray | Examples, seq_len: int, global_batch: int) -> int:
    return -(-num_eval_rows(data, seq_len) // global_batch)


def num_eval_rows(data: np.ndarray | Examples, seq_len: int) -> int:
    """Rows (windows or examples) in a complete validation pass."""
    return _rows(data, seq_len, "validation").n
