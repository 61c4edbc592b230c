"""Training through the CLI: exact resume after kill -9 and SIGTERM, multi-host = single host, learning,
evaluation against an independent computation, fine-tuning, and bad input that leaves the workdir untouched."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, assert_one_line_error, cli_in_process, run_cli
from helpers.env import with_test_flags
from helpers.train_cli import TINY, final_params, popen_cli, snapshot, train_args

@pytest.fixture(scope="module")
def small_text(corpus, tmp_path_factory) -> dict:
    """30 KB of the corpus: a final validation pass over its split is a few batches, not hundreds."""
    root = tmp_path_factory.mktemp("small_text")
    (root / "text.txt").write_text(open(corpus["data"]).read()[:30_000])
    return {"data": str(root / "text.txt"), "data_dir": str(root / "data")}


def wait_for_checkpoint(proc, workdir: Path, timeout=300) -> None:
    """Returns once some checkpoint step directory is committed (orbax renames it into place when done)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        ckpts = workdir / "checkpoints"
        if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before its first checkpoint:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared in time")


def test_resume_after_kill9_and_sigterm_is_bitwise_exact(small_text, tmp_path, capsys):
    # Each save blocks the loop for a good part of a second: ten saves after the first one keep the run going
    # well past the moment the test sees that first checkpoint.
    train = ["--lr", "3e-3", "--set", "dropout=0.1"]
    steps = ["--steps", "100", "--checkpoint-every", "10", *train]
    # The reference needs no process of its own, and saving checkpoints does not change what it computes.
    ref = cli_in_process(capsys, *train_args(small_text, tmp_path / "ref", "--steps", "100", "--checkpoint-every",
                                             "0", *train))
    assert ref.returncode == 0, ref.stderr
    expected = final_params(tmp_path / "ref")

    for how in (signal.SIGKILL, signal.SIGTERM):
        workdir = tmp_path / how.name
        proc = popen_cli(*train_args(small_text, workdir, *steps))
        wait_for_checkpoint(proc, workdir)
        proc.send_signal(how)
        proc.wait(timeout=120)
        stderr = proc.stderr.read()
        if how == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
        else:  # saved a checkpoint at the step it reached, said so, exited 128 + 15
            assert proc.returncode == 143, stderr
            assert "checkpoint saved" in (proc.stdout.read() + stderr)
        interrupted_at = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
        assert interrupted_at < 100, "the run finished before it was interrupted; nothing was resumed"
        again = cli_in_process(capsys, *train_args(small_text, workdir, *steps))
        assert again.returncode == 0, again.stderr
        assert "resumed from" in again.stdout + again.stderr
        got = final_params(workdir)
        for key, value in expected.items():
            np.testing.assert_array_equal(got[key], value, err_msg=f"{how.name}: {key}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["pmap", "shard_map", "mesh"])
def test_two_processes_of_four_devices_equal_one_process_of_eight(small_text, tmp_path, mode):
    corpus = small_text  # a short validation split: the final pass is a few batches
    args = ["--steps", "6", "--batch-size", "16", "--checkpoint-every", "3", "--parallel", mode]
    if mode == "mesh":  # FSDP and tensor parallelism across processes; data spans the hosts, tensor stays inside one
        args += ["--mesh", "data=2,fsdp=2,tensor=2", "--set", "n_head=4"]
    one = run_cli(*train_args(corpus, tmp_path / "one", *args),
                  env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert one.returncode == 0, one.stderr
    port = _free_port()
    procs = []
    for pid in range(2):
        env = with_test_flags({**os.environ, "JAX_PLATFORMS": "cpu",
                               "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "AIGC_COORDINATOR": f"localhost:{port}",
                               "AIGC_NUM_PROCESSES": "2", "AIGC_PROCESS_ID": str(pid)})
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "aigc_jax", *train_args(corpus, tmp_path / "two", *args, "--distributed")],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    a, b = final_params(tmp_path / "one"), final_params(tmp_path / "two")
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)
    losses = [[json.loads(line)["loss"] for line in open(tmp_path / d / "metrics.jsonl") if '"train"' in line]
              for d in ("one", "two")]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


def test_loss_falls_well_below_unigram_entropy(shakespeare_path, tmp_path, capsys):
    data = np.frombuffer(shakespeare_path.read_bytes(), np.uint8)
    p = np.bincount(data, minlength=256) / len(data)
    unigram_nats = float(-(p[p > 0] * np.log(p[p > 0])).sum())  # ≈ 3.31
    proc = cli_in_process(capsys, "train", "--model", "tiny", "--set", "n_embd=64", "--set", "n_head=4", "--data",
                          shakespeare_path, "--data-dir", tmp_path / "data", "--workdir", tmp_path / "run", "--steps",
                          "150", "--batch-size", "16", "--seq-len", "64", "--lr", "3e-3", "--warmup-steps", "10",
                          "--eval-every", "0", "--checkpoint-every", "0", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["val_loss"] < unigram_nats - 0.5, (result, unigram_nats)


def test_eval_matches_an_independent_computation(small_text, tmp_path, capsys):
    corpus = small_text
    import jax
    import jax.numpy as jnp

    from aigc_jax import data, model
    from aigc_jax.modeldir import load_workdir as load_inference

    workdir = tmp_path / "run"
    assert cli_in_process(capsys, *train_args(corpus, workdir, "--steps", "5")).returncode == 0
    proc = cli_in_process(capsys, "eval", "--workdir", workdir, "--data-dir", corpus["data_dir"])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    # Independently: every validation window once, plain numpy log-softmax over the real vocabulary.
    config, params, tokenizer = load_inference(str(workdir))
    stream = np.asarray(data.load(corpus["data"], tokenizer, corpus["data_dir"]).validation, np.int64)
    n = (len(stream) - 1) // 32
    windows = np.stack([stream[i * 32: i * 32 + 33] for i in range(n)])
    logits = np.asarray(jax.jit(lambda t: model.forward(params, t, config)[0])(jnp.asarray(windows[:, :-1])))
    logits = logits[..., : config.vocab_size].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, windows[:, 1:, None], -1).mean()
    assert out["tokens"] == n * 32
    np.testing.assert_allclose(out["loss"], nll, rtol=1e-5)
    np.testing.assert_allclose(out["perplexity"], np.exp(nll), rtol=1e-5)
    assert set(out) == {"loss", "perplexity", "bits_per_byte", "tokens"}


def test_finetune_on_prompt_completion_from_a_checkpoint_and_an_hf_dir(small_text, tmp_path, capsys):
    base = tmp_path / "base"
    assert cli_in_process(capsys, *train_args(small_text, base, "--steps", "5")).returncode == 0
    rows = [{"prompt": f"{w} -> ", "completion": w.upper()} for w in
            "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda omicron sigma omega".split() * 8]
    jsonl = tmp_path / "sft.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    hf = tmp_path / "hf"
    assert cli_in_process(capsys, "convert", "--to-hf", base, "--out", hf).returncode == 0
    for name, src in (("from_ckpt", base), ("from_hf", hf)):
        proc = cli_in_process(capsys, "train", "--init-from", src, "--data", jsonl, "--data-dir", tmp_path / "data",
                       "--workdir", tmp_path / name, "--steps", "30", "--batch-size", "8", "--seq-len", "32",
                       "--lr", "3e-3", "--warmup-steps", "0", "--eval-every", "0", "--no-progress", "--log-every", "1")
        assert proc.returncode == 0, proc.stderr
        losses = [json.loads(line)["loss"] for line in open(tmp_path / name / "metrics.jsonl") if '"train"' in line]
        assert losses[-1] < 0.7 * losses[0], losses
        tokens = [json.loads(line)["tokens"] for line in open(tmp_path / name / "metrics.jsonl") if '"train"' in line]
        assert max(tokens) < 8 * 32 / 2  # only completion tokens (+ EOT) count, never prompts or padding
        run = json.loads((tmp_path / name / "run.json").read_text())
        assert run["model"]["n_embd"] == 32 and run["init_from"] == str(src)


def test_bad_input_is_one_line_and_leaves_the_workdir_untouched(small_text, tmp_path, capfd):
    # In this process, taken at the file descriptors (capfd): all a separate process would print. The corrupt
    # checkpoint keeps a process of its own: what a failed restore leaves behind may print as the process ends.
    corpus = small_text
    workdir = tmp_path / "run"
    first = cli_in_process(capfd, *train_args(corpus, workdir, "--steps", "2", "--checkpoint-every", "1"))
    assert first.returncode == 0, first.stderr
    before = snapshot(workdir)
    cases = [
        (["--steps", "3", "--lr", "1e-2"], "train.lr"),  # a different run in the same workdir
        (["--steps", "0"], "train.steps must be >= 1"),
        (["--steps", "3", "--set", "n_head=5"], "must divide"),
        (["--steps", "3", "--parallel", "pjit"], "train.parallel must be one of"),
        (["--steps", "3", "--batch-size", "9", "--grad-accum", "2"], "divisible"),
        (["--steps", "3", "--set", "bogus=1"], "unknown key"),
        (["--steps", "3", "--seq-len", "1000"], "exceeds"),
        (["--steps", "3", "--init-from", str(tmp_path / "nope")], "drop --model"),  # the source has the architecture
        (["--steps", "3", "--config", str(tmp_path / "nope.json")], "does not exist"),
        (["--steps", "3", "--tokenizer", "wordpiece"], "--tokenizer"),
    ]
    for extra, needle in cases:
        assert_one_line_error(cli_in_process(capfd, *train_args(corpus, workdir, *extra)), needle)
    missing = ["train", *TINY, "--data", str(tmp_path / "missing.txt"), "--workdir", str(workdir), "--steps", "3"]
    assert_one_line_error(cli_in_process(capfd, *missing), "missing.txt")
    no_source = ["train", *TINY[2:], "--data", corpus["data"], "--workdir", tmp_path / "fresh", "--init-from",
                 tmp_path / "nope"]
    assert_one_line_error(cli_in_process(capfd, *no_source), "does not exist")
    assert not (tmp_path / "fresh").exists()
    assert snapshot(workdir) == before

    # A corrupt checkpoint is an error naming it, never a silent restart from scratch.
    latest = workdir / "checkpoints" / "2"
    victim = max((p for p in (latest / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(b"\0" * victim.stat().st_size)
    before = snapshot(workdir)
    assert_one_line_error(run_cli(*train_args(corpus, workdir, "--steps", "4", "--checkpoint-every", "1")),
                          "checkpoints/2 is unreadable")
    assert snapshot(workdir) == before

    # A non-empty directory that is not a run is refused before anything is written into it.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert_one_line_error(cli_in_process(capfd, *train_args(corpus, other, "--steps", "2")), "not empty")
    assert snapshot(other) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}


# ------------------------------------------------------------------------------------------ what a run shows


def tensorboard_scalars(directory: Path) -> dict:
    """{tag: [(step, value), …]} read back from the TFRecord event files (length, crc, Event proto, crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out




def test_outside_a_terminal_a_run_prints_plain_lines_and_feeds_tensorboard(small_text, tmp_path):
    t0 = time.time()
    proc = run_cli("train", "--model", "tiny", "--data", small_text["data"], "--data-dir", small_text["data_dir"],
                   "--workdir", tmp_path / "w", "--steps", "4", "--batch-size", "4", "--seq-len", "32",
                   "--log-every", "2", "--eval-every", "2")  # stderr is a pipe here
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr
    lines = proc.stderr.splitlines()
    number = r"[\d,]+"
    assert re.fullmatch(rf"step 2/4 \| loss \d\.\d{{4}} \| {number} ms/step \| {number} tok/s \| val loss \d\.\d{{4}}",
                        lines[0]), lines
    assert re.fullmatch(rf"step 4/4 \| loss \d\.\d{{4}} \| {number} ms/step \| {number} tok/s", lines[1]), lines
    assert lines[2].startswith("final validation: ") and lines[-1].endswith("tokens (100%)"), lines
    assert 3 <= len(lines) - 2 <= 5  # the start and a line per quarter, at most

    records = [json.loads(line) for line in open(tmp_path / "w" / "metrics.jsonl")]
    assert all(t0 <= r["time"] <= time.time() for r in records)
    scalars = tensorboard_scalars(tmp_path / "w" / "tb")
    train_losses = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    assert [s for s, _ in scalars["train/loss"]] == [s for s, _ in train_losses] == [2, 4]
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [v for _, v in train_losses], rtol=1e-6)
    assert [s for s, _ in scalars["eval/loss"]] == [2, 4] and "train/time" not in scalars


def test_weights_and_biases_offline(small_text, tmp_path):
    pytest.importorskip("wandb")
    proc = run_cli("train", "--model", "tiny", "--data", small_text["data"], "--data-dir", small_text["data_dir"],
                   "--workdir", tmp_path / "w", "--steps", "2", "--batch-size", "4", "--seq-len", "32",
                   "--eval-every", "0", "--set", "wandb_project=aigc-test", "--set", "wandb_mode=offline",
                   env={"WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "w" / "wandb-id").is_file()
    assert any(p.name.startswith("offline-run-") for p in (tmp_path / "w" / "wandb").iterdir())


def test_weights_and_biases_asked_for_but_not_installed(tmp_path, capsys):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    proc = cli_in_process(capsys, "train", "--model", "tiny", "--workdir", tmp_path / "w", "--set",
                          "wandb_project=mine")
    assert_one_line_error(proc, "pip install wandb")
    assert not (tmp_path / "w").exists()
