"""Step-indexed batches and prompt→completion examples: pure numpy, no tfds."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from aigc_jax import data, tokenizers
from aigc_jax.data import batches as batches_lib
from aigc_jax.errors import UserError

T = 16


def stream(n: int) -> np.ndarray:
    # Distinct values make every window identifiable by its first token.
    return np.arange(n, dtype=np.uint32)


def window_ids(tokens: np.ndarray) -> list[int]:
    return [int(row[0]) // T for row in tokens]


def test_windows_are_stride_t_slices_of_t_plus_one_tokens():
    tokens = stream(10 * T + 5)
    b = data.Batches(tokens, T, global_batch=4, seed=3).batch(0)
    assert b["tokens"].dtype == np.int32 and b["tokens"].shape == (4, T + 1)
    assert b["loss_mask"].dtype == np.float32 and b["loss_mask"].shape == (4, T)
    assert (b["loss_mask"] == 1).all()
    for row in b["tokens"]:
        assert row[0] % T == 0
        np.testing.assert_array_equal(row, tokens[row[0] : row[0] + T + 1])


def test_same_seed_and_step_give_the_same_batch_and_other_seeds_differ():
    tokens = stream(100 * T + 1)
    a, b = data.Batches(tokens, T, 8, seed=5), data.Batches(tokens, T, 8, seed=5)
    batches_lib._permutation.cache_clear()
    for step in (0, 1, 17, 12, 300):
        np.testing.assert_array_equal(a.batch(step)["tokens"], b.batch(step)["tokens"])
    assert not np.array_equal(a.batch(0)["tokens"], data.Batches(tokens, T, 8, seed=6).batch(0)["tokens"])


def test_permutation_is_pinned():
    # Resume must be exact across machines and NumPy upgrades: the order comes from PCG64's raw stream.
    assert batches_lib._permutation(0, 0, 10).tolist() == [3, 2, 1, 8, 6, 0, 7, 4, 5, 9]
    assert batches_lib._permutation(1234, 7, 12).tolist() == [8, 9, 10, 1, 11, 0, 7, 5, 2, 3, 6, 4]


@pytest.mark.parametrize("n_windows,global_batch", [(24, 8), (29, 8), (5, 8)])
def test_each_epoch_visits_every_window_once(n_windows, global_batch):
    sampler = data.Batches(stream(n_windows * T + 1), T, global_batch, seed=1)
    assert sampler.num_rows == n_windows and sampler.steps_per_epoch == n_windows // global_batch
    steps = -(-3 * n_windows // global_batch) + 1
    seen = [w for s in range(steps) for w in window_ids(sampler.batch(s)["tokens"])]
    for e in range(3):
        assert sorted(seen[e * n_windows : (e + 1) * n_windows]) == list(range(n_windows))
    assert seen[:n_windows] != seen[n_windows : 2 * n_windows]  # a fresh order each epoch


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_take_disjoint_slices_of_the_same_global_batch(process_count):
    tokens, global_batch = stream(40 * T + 1), 8
    whole = data.Batches(tokens, T, global_batch, seed=9)
    parts = [data.Batches(tokens, T, global_batch, seed=9, process_index=p, process_count=process_count)
             for p in range(process_count)]
    assert all(p.local_batch == global_batch // process_count for p in parts)
    epoch = []
    for step in range(whole.steps_per_epoch):
        joined = np.concatenate([p.batch(step)["tokens"] for p in parts])
        np.testing.assert_array_equal(joined, whole.batch(step)["tokens"])
        epoch += window_ids(joined)
    assert sorted(epoch) == list(range(40))


def test_restart_reproduces_the_uninterrupted_run():
    tokens = stream(37 * T + 3)
    uninterrupted = [data.Batches(tokens, T, 6, seed=2).batch(s)["tokens"] for s in range(20)]
    batches_lib._permutation.cache_clear()
    resumed = data.Batches(tokens, T, 6, seed=2)
    for s in reversed(range(11, 20)):  # any order, from any step: no iterator state
        np.testing.assert_array_equal(resumed.batch(s)["tokens"], uninterrupted[s])


def test_a_memmap_stream_is_batched_without_loading_it(tmp_path):
    path = tmp_path / "t.bin"
    stream(50 * T + 1).astype(np.uint16).tofile(path)
    mm = np.memmap(path, np.uint16, mode="r")
    np.testing.assert_array_equal(data.Batches(mm, T, 4, seed=0).batch(3)["tokens"],
                                  data.Batches(stream(50 * T + 1), T, 4, seed=0).batch(3)["tokens"])


@pytest.mark.parametrize("process_count", [1, 3])
def test_eval_pass_counts_every_window_exactly_once(process_count):
    n_windows, global_batch = 23, 6
    tokens = stream(n_windows * T + 1)
    per_process = [list(data.eval_batches(tokens, T, global_batch, p, process_count)) for p in range(process_count)]
    assert {len(b) for b in per_process} == {data.num_eval_batches(tokens, T, global_batch)} == {4}
    counted = []
    for batches in per_process:
        for b in batches:
            live = b["loss_mask"].sum(axis=1) > 0
            assert set(b["loss_mask"][~live].ravel()) <= {0.0}
            counted += window_ids(b["tokens"][live])
    assert sorted(counted) == list(range(n_windows))


def test_batch_layout_errors():
    with pytest.raises(UserError, match=r"has 16 tokens, fewer than one window of seq_len \+ 1 = 17"):
        data.Batches(stream(16), T, 2)
    with pytest.raises(UserError, match="does not split evenly over 3 processes"):
        data.Batches(stream(10 * T + 1), T, 8, process_count=3)
    with pytest.raises(UserError, match="validation split has 5 tokens"):
        next(data.eval_batches(stream(5), T, 2))


# --- prompt→completion examples --------------------------------------------------------------------------------

PAIRS = [(f"Q{i}: what is {i} + {i}?\nA:", f" {2 * i}, of course{'!' * (i % 3)}") for i in range(30)]


def write_jsonl(path, pairs, extra_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for p, c in pairs:
            f.write(json.dumps({"prompt": p, "completion": c}) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def test_sft_loss_mask_covers_exactly_the_completion_and_eot(tmp_path):
    tok = tokenizers.byte_level()
    pairs = PAIRS + [("café ⟶ ", "naïve ünïcode")]
    ds = data.load(str(write_jsonl(tmp_path / "sft.jsonl", pairs)), tok, data_dir=tmp_path / "d")
    assert len(ds.train) + len(ds.validation) == len(pairs) and len(ds.validation) >= 1
    by_prompt = dict(pairs)
    for split in (ds.train, ds.validation):
        seen = 0
        for b in data.eval_batches(split, 64, 4):
            for tokens, mask in zip(b["tokens"], b["loss_mask"]):
                if not mask.any():
                    continue
                masked = np.flatnonzero(mask)
                first, k = int(masked[0]), len(masked)
                np.testing.assert_array_equal(masked, np.arange(first, first + k))  # one contiguous span
                completion = by_prompt[tok.decode(tokens[: first + 1])]  # everything before it is the prompt
                assert tok.decode(tokens[first + 1 : first + 1 + k]) == completion + tokenizers.EOT
                assert (tokens[first + 1 + k :] == 0).all()  # then only padding
                seen += 1
        assert seen == len(split)
    sampler = data.Batches(ds.train, 64, 1, seed=0)  # one example per step: an epoch shows each exactly once
    epoch = {tok.decode(sampler.batch(s)["tokens"][0]) for s in range(sampler.steps_per_epoch)}
    assert len(epoch) == len(ds.train) == sampler.steps_per_epoch
    completion_bytes = sum(len(by_prompt[tok.decode(ds.validation[i][: ds.validation.prompt_lens[i]])].encode())
                           for i in range(len(ds.validation)))
    assert ds.bytes_per_token == pytest.approx(completion_bytes / (completion_bytes + len(ds.validation)))


def test_sft_truncation_warns_and_a_prompt_filling_the_window_is_an_error(tmp_path):
    tok = tokenizers.byte_level()
    ds = data.load(str(write_jsonl(tmp_path / "s.jsonl", [("p" * 10, "c" * 30), ("q" * 5, "d" * 3)] * 3)), tok,
                   data_dir=tmp_path / "d")
    split = ds.train if any(ds.train.lengths > 20) else ds.validation
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = batches_lib._Padded(split, 20, "train").rows(np.arange(len(split)))
    assert any("truncated" in str(w.message) for w in caught)
    long_row = rows["loss_mask"][int(np.argmax(split.lengths))]
    # 10 prompt + 30 completion + EOT tokens, cut to 21: positions 9..19 predict completion tokens 10..20.
    np.testing.assert_array_equal(np.flatnonzero(long_row), np.arange(9, 20))
    with pytest.raises(UserError, match="prompts of at least seq_len \\+ 1 = 10 tokens"):
        batches_lib._Padded(split, 9, "train")


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "a", "completion": ', r"bad\.jsonl:3: not valid JSON"),
    ('{"prompt": "a"}', r"bad\.jsonl:3: expected an object with string 'prompt' and 'completion', got \['prompt'\]"),
    ('["a", "b"]', r"bad\.jsonl:3: expected an object .* got list"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", PAIRS[:1], extra_lines=["", line])
    with pytest.raises(UserError, match=message):
        data.load(str(path), tokenizers.byte_level(), data_dir=tmp_path / "d")
    assert not list((tmp_path / "d").rglob("meta.json"))  # nothing cached from a malformed file


def test_shift_windows_moves_each_later_epoch_and_keeps_epochs_without_replacement():
    T, B = 8, 4
    tokens = np.arange(203, dtype=np.uint16)  # token value = its position, so a row tells where it starts
    plain = data.Batches(tokens, T, B, seed=3)
    shifted = data.Batches(tokens, T, B, seed=3, shift_windows=True)
    assert shifted.num_rows == plain.num_rows - 1  # one window per epoch makes room for the shift
    n = shifted.num_rows
    starts_by_epoch: dict[int, list[int]] = {}
    for step in range(6 * n // B):
        batch = shifted.batch(step)
        np.testing.assert_array_equal(batch["tokens"][:, 1:] - batch["tokens"][:, :-1], 1)  # contiguous windows
        for g, start in zip(range(step * B, step * B + B), batch["tokens"][:, 0]):
            starts_by_epoch.setdefault(g // n, []).append(int(start))
    shifts = set()
    for epoch, starts in starts_by_epoch.items():
        if len(starts) < n:
            continue
        offsets = {s % T for s in starts}
        assert len(offsets) == 1 and len(set(starts)) == n  # one alignment per epoch, no window twice
        assert max(starts) + T < len(tokens)
        shifts |= offsets
        if epoch == 0:  # epoch 0 is exactly the unshifted order
            assert offsets == {0}
    assert len(shifts) > 2  # later epochs really use other alignments
    # Still a pure function of the step: a fresh sampler (a resumed run) gives the same batches.
    again = data.Batches(tokens, T, B, seed=3, shift_windows=True)
    for step in (0, 7, 40):
        np.testing.assert_array_equal(again.batch(step)["tokens"], shifted.batch(step)["tokens"])
