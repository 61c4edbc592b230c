"""What a researcher must be able to trust about a run: a start killed at any instant re-runs with the same command,
fine-tunes keep the source's settings, resume checks content (data, tokenizer, checkpoint meta) rather than names,
schedules say what extending a run does, and a new process reuses compiled programs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli
from conftest import cli_in_process as cli
from helpers.cli_calls import run_calls
from helpers.train_cli import final_params, popen_cli, snapshot, train_args

from aigc_jax import data
from aigc_jax.train import loop
from aigc_jax.train.config import TrainConfig
from aigc_jax.train.optimizer import schedule


# ------------------------------------------------------------------------------------------ preemption at start


def _signal_when(proc, ready, sig, timeout=300) -> bool:
    """Sends `sig` once `ready()` holds (polled every 10 ms); False if the run ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            proc.send_signal(sig)
            proc.wait(timeout=120)
            return True
        time.sleep(0.01)
    assert proc.poll() is not None, "the stage never came"
    return False


def test_a_start_killed_at_any_instant_reruns_with_the_same_command(text, tmp_path, capsys):
    """Signals at each stage of a start — still importing, the run files just written (data loaded, compiling),
    the checkpoint directory made (first steps) — and the same command then finishes the run (here, in this
    process: only the killed start needs a process of its own)."""
    corpus = text
    args = ["--steps", "30", "--checkpoint-every", "10"]
    stages = [
        ("starting", lambda w: True, signal.SIGTERM),
        ("run files written", lambda w: (w / "run.json").exists(), signal.SIGTERM),
        ("run files written", lambda w: (w / "run.json").exists(), signal.SIGKILL),
        ("checkpoint dir made", lambda w: (w / "checkpoints").is_dir(), signal.SIGKILL),
    ]
    for i, (stage, ready, sig) in enumerate(stages):
        workdir = tmp_path / f"w{i}"
        proc = popen_cli(*train_args(corpus, workdir, *args))
        assert _signal_when(proc, lambda: ready(workdir), sig), f"{stage}: the run finished before the signal"
        assert proc.returncode != 0, stage
        again = cli(capsys, *train_args(corpus, workdir, *args))
        assert again.returncode == 0, (stage, sig, again.stderr[-2000:])
        assert json.loads(again.stdout.strip().splitlines()[-1])["step"] == 30, stage


@pytest.mark.parametrize("leftovers", [
    {"checkpoints/": None},  # the first failure reported: only an empty checkpoint directory
    {"model.json": "{}", "tokenizer.json.tmp-123": "partial"},  # killed while writing the run files
    {"model.json": "{}", "tokenizer.json": "{}", "run.json.tmp-9": "{", "checkpoints/x.orbax-checkpoint-tmp-1/": None},
])
def test_leftovers_of_a_killed_start_are_started_over(text, tmp_path, capsys, leftovers):
    workdir = tmp_path / "w"
    for name, content in leftovers.items():
        path = workdir / name
        if content is None:
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
    proc = cli(capsys, *train_args(text, workdir, "--steps", "2"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((workdir / "run.json").read_text())["train"]["steps"] == 2


def test_a_users_files_are_never_taken_for_leftovers(text, tmp_path, capfd):
    workdir = tmp_path / "w"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "notes.md").write_text("mine")
    assert_one_line_error(cli(capfd, *train_args(text, workdir, "--steps", "2")), "not empty")
    assert sorted(os.listdir(workdir)) == ["checkpoints", "notes.md"]


# ------------------------------------------------------------------------------------------ fine-tune settings


def test_finetune_keeps_the_sources_settings_and_only_what_was_set(text, tmp_path, capfd):
    corpus = text
    base = tmp_path / "base"  # `tiny` trains without dropout; the default preset (baby) has 0.2
    assert cli(capfd, *train_args(corpus, base, "--steps", "3")).returncode == 0

    def finetune(workdir, *extra, steps="2"):
        return cli(capfd, "train", "--init-from", base, "--data", corpus["data"], "--data-dir", corpus["data_dir"],
                       "--steps", steps, "--batch-size", "8", "--seq-len", "32", "--eval-every", "0", "--no-progress",
                       "--workdir", workdir, *extra)

    plain = finetune(tmp_path / "ft")
    assert plain.returncode == 0, plain.stderr
    run = json.loads((tmp_path / "ft" / "run.json").read_text())
    assert (run["model"]["dropout"], run["model"]["attn_dropout"], run["model"]["n_embd"]) == (0.0, 0.0, 32)
    assert f"fine-tuning {base}" in plain.stdout and "dropout=0.0" in plain.stdout  # the effective settings
    tuned = finetune(tmp_path / "ft2", "--set", "dropout=0.1", "--set", "n_layer=2")
    assert tuned.returncode == 0, tuned.stderr  # n_layer=2 is the source's own value: allowed
    assert json.loads((tmp_path / "ft2" / "run.json").read_text())["model"]["dropout"] == 0.1
    assert_one_line_error(finetune(tmp_path / "x", "--set", "n_layer=3"), "cannot change model.n_layer")
    assert_one_line_error(finetune(tmp_path / "x", "--model", "tiny"), "drop --model")

    # Resuming a fine-tune needs only the workdir: the source may be gone.
    shutil.move(base, tmp_path / "moved")
    resumed = finetune(tmp_path / "ft", steps="4")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout + resumed.stderr


# ------------------------------------------------------------------------------------------ resume by workdir


@pytest.fixture(scope="module")
def small_data(corpus, tmp_path_factory) -> dict:
    """30 KB of text and 200 prompt→completion examples: each run's final validation pass is a few batches."""
    root = tmp_path_factory.mktemp("small")
    (root / "text.txt").write_text(open(corpus["data"]).read()[:30_000])
    words = [w for w in open(__file__).read().split() if len(w) <= 6][:200]
    (root / "sft.jsonl").write_text("\n".join(json.dumps({"prompt": f"{w}:", "completion": w[::-1]}) for w in words))
    return {"text": str(root / "text.txt"), "jsonl": str(root / "sft.jsonl"), "data_dir": str(root / "data")}


@pytest.fixture(scope="module")
def text(small_data) -> dict:
    """`train_args`' data: the 30 KB text, so that each run's final validation pass is a few batches."""
    return {"data": small_data["text"], "data_dir": small_data["data_dir"]}


def _train_losses(workdir) -> dict:
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


# Every family with every kind of data: a resume reads both the family's model.json fields and the data's rows.
@pytest.mark.parametrize("family,kind", [("tiny", "jsonl"), ("llama-tiny", "text"), ("tiny", "text"),
                                         ("llama-tiny", "jsonl")])
def test_every_family_and_kind_of_data_resumes_as_if_never_stopped(small_data, tmp_path, capsys, family, kind):
    """A run stopped at step 2, re-run by the identical command to step 4 and then by its workdir alone to step 6,
    has the losses and parameters of a run never stopped (dropout on; decay_steps fixed, so growing --steps keeps
    the schedule)."""
    command = ["train", "--model", family, "--data", small_data[kind], "--data-dir", small_data["data_dir"],
               "--batch-size", "4", "--seq-len", "16", "--eval-every", "0", "--log-every", "1", "--set", "decay_steps=6", "--set",
               "dropout=0.1", "--no-progress"]
    ref, stopped = tmp_path / "ref", tmp_path / "stopped"
    assert cli(capsys, *command, "--workdir", ref, "--steps", "6").returncode == 0
    assert cli(capsys, *command, "--workdir", stopped, "--steps", "2").returncode == 0
    same = cli(capsys, *command, "--workdir", stopped, "--steps", "4")
    assert same.returncode == 0, same.stderr
    alone = cli(capsys, "train", "--workdir", stopped, "--steps", "6")
    assert alone.returncode == 0, alone.stderr
    assert "resumed from" in same.stdout and "resumed from" in alone.stdout
    assert _train_losses(stopped) == _train_losses(ref) and len(_train_losses(ref)) == 6
    expected = final_params(ref)
    for key, value in final_params(stopped).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)


def test_a_flag_that_contradicts_the_workdir_is_named(small_data, tmp_path, capsys):
    workdir = tmp_path / "w"
    command = ["train", "--model", "tiny", "--data", small_data["text"], "--data-dir", small_data["data_dir"],
               "--batch-size", "4", "--seq-len", "32", "--eval-every", "0", "--no-progress", "--workdir", workdir]
    assert cli(capsys, *command, "--steps", "1").returncode == 0
    before = snapshot(workdir)
    for flags, named in [(["--model", "baby"], "--model baby"), (["--lr", "0.1"], "--lr 0.1"),
                         (["--set", "n_layer=3"], "--set n_layer=3"), (["--seq-len", "16"], "--seq-len 16"),
                         (["--data", "default"], "--data default"), (["--tokenizer", "char"], "--tokenizer char")]:
        proc = cli(capsys, "train", "--workdir", workdir, "--steps", "2", *flags)
        assert_one_line_error(proc, f"{named} contradicts --workdir", f"drop {named}")
    assert snapshot(workdir) == before
    # Flags that agree with the record, and the ones a resume may change, are fine.
    again = cli(capsys, *command, "--steps", "2", "--log-every", "1", "--checkpoint-every", "1")
    assert again.returncode == 0, again.stderr


def test_a_new_run_without_flags_gets_the_defaults(tmp_path):
    from aigc_jax import configs
    from aigc_jax.cli import build_parser
    from aigc_jax.commands.train import build_configs

    settings = build_configs(build_parser().parse_args(["train", "--workdir", str(tmp_path / "new")]))
    assert settings.model_config == configs.get_preset("baby")
    assert settings.train_config == TrainConfig()
    assert (settings.data, settings.tokenizer, settings.init_from) == ("default", "byte", None)


# ------------------------------------------------------------------------------------------ resume checks content


def test_resume_refuses_different_content_at_the_same_path(corpus, tmp_path, capfd):
    text = tmp_path / "text.txt"
    text.write_text(open(corpus["data"]).read()[:60_000])
    args = ["train", "--model", "tiny", "--batch-size", "4", "--seq-len", "16", "--eval-every", "0", "--no-progress",
            "--data", text, "--data-dir", tmp_path / "d", "--workdir", tmp_path / "w", "--checkpoint-every", "1"]
    assert cli(capfd, *args, "--steps", "2").returncode == 0
    text.write_text(open(corpus["data"]).read()[60_000:120_000])  # other text, same path
    assert_one_line_error(cli(capfd, *args, "--steps", "4"), "now holds different tokens", "data_hash")

    rows = [{"prompt": f"{w}:", "completion": w[::-1]} for w in "ab cd ef gh ij kl mn op qr st".split()]
    jsonl = tmp_path / "sft.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows[:7]))
    sft = ["train", "--init-from", tmp_path / "w", "--data", jsonl, "--data-dir", tmp_path / "d", "--batch-size", "2",
           "--seq-len", "16", "--eval-every", "0", "--no-progress", "--workdir", tmp_path / "sft", "--checkpoint-every",
           "1"]
    text.write_text(open(corpus["data"]).read()[:60_000])
    assert cli(capfd, *sft, "--steps", "2").returncode == 0
    jsonl.write_text("\n".join(json.dumps(r) for r in rows[:9]))  # 9 examples instead of 7
    assert_one_line_error(cli(capfd, *sft, "--steps", "4"), "now holds different tokens")


def test_resume_reads_the_workdirs_tokenizer_and_checks_its_hash(corpus, tmp_path, monkeypatch):
    from aigc_jax import tokenizers as tok

    text = tmp_path / "text.txt"
    text.write_text(open(corpus["data"]).read()[:20_000] * 2)  # validation's characters all occur in training
    cfg = TrainConfig(steps=2, batch_size=4, seq_len=16, eval_every=0, progress=False, checkpoint_every=1)
    from aigc_jax import configs

    tiny = configs.get_preset("tiny")
    run = loop.prepare(str(tmp_path / "w"), tiny, cfg, str(text), str(tmp_path / "d"), "char")
    loop.train(run, log=lambda *_: None)
    # A resume never re-derives the vocabulary from the corpus: it reads WORKDIR/tokenizer.json.
    monkeypatch.setattr("aigc_jax.train.prepare._make_tokenizer", lambda *a: pytest.fail("tokenizer re-derived on resume"))
    again = loop.prepare(str(tmp_path / "w"), tiny, cfg.__class__(**{**cfg.to_dict(), "steps": 3}), str(text),
                         str(tmp_path / "d"), "char")
    assert again.resume_step == 2 and again.tokenizer.vocab_size == run.tokenizer.vocab_size
    tok.char_level("abc").save(tmp_path / "w")  # a tokenizer.json that is not the run's
    with pytest.raises(loop.UserError, match="tokenizer_hash"):
        loop.prepare(str(tmp_path / "w"), tiny, cfg, str(text), str(tmp_path / "d"), "char")


def test_checkpoint_meta_is_validated_on_restore(text, tmp_path, capfd):
    workdir = tmp_path / "w"
    args = train_args(text, workdir, "--checkpoint-every", "1")
    assert cli(capfd, *args, "--steps", "2").returncode == 0
    meta = workdir / "checkpoints" / "2" / "meta" / "metadata"
    record = json.loads(meta.read_text())
    meta.write_text(json.dumps({**record, "seed": 7}))  # e.g. a checkpoint copied in from another run
    assert_one_line_error(cli(capfd, *args, "--steps", "3"), "belongs to another run", "seed=7")


# ------------------------------------------------------------------------------------------ schedules


def test_wsd_and_constant_schedules():
    wsd = schedule(TrainConfig(steps=1000, warmup_steps=100, lr=6e-4, schedule="wsd", decay_fraction=0.2))
    assert float(wsd(50)) == pytest.approx(3e-4) and float(wsd(500)) == pytest.approx(6e-4)
    assert float(wsd(799)) == pytest.approx(6e-4) and float(wsd(900)) == pytest.approx((6e-4 + 6e-5) / 2)
    assert float(wsd(1000)) == pytest.approx(6e-5)
    const = schedule(TrainConfig(steps=1000, warmup_steps=10, lr=1e-3, schedule="constant"))
    assert [float(const(s)) for s in (5, 10, 999, 5000)] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])
    # Extending a wsd run before its decay keeps every lr it has seen; cosine would jump (the numbers).
    longer = schedule(TrainConfig(steps=2000, warmup_steps=100, lr=6e-4, schedule="wsd", decay_fraction=0.2))
    assert all(float(longer(s)) == float(wsd(s)) for s in range(0, 800, 50))
    cos = [schedule(TrainConfig(steps=n, warmup_steps=100, lr=6e-4)) for n in (1000, 2000)]
    assert float(cos[0](1000)) == pytest.approx(6.0e-5) and float(cos[1](1000)) == pytest.approx(3.52e-4, rel=1e-2)


def test_growing_steps_says_what_happens_to_the_lr(text, tmp_path, capsys):
    args = train_args(text, tmp_path / "cos", "--checkpoint-every", "2", "--warmup-steps", "1")
    assert cli(capsys, *args, "--steps", "4").returncode == 0
    longer = cli(capsys, *args, "--steps", "8")
    assert longer.returncode == 0, longer.stderr
    assert "--steps 4 -> 8 changes the cosine schedule: the lr at step 4 moves from" in longer.stdout
    same = cli(capsys, *args, "--steps", "8")
    assert same.returncode == 0 and "changes the" not in same.stdout  # nothing changed, nothing said


# ------------------------------------------------------------------------------------------ evaluation


def test_periodic_validation_samples_the_whole_split():
    tokens = np.arange(10_001)  # window i starts with token 10·i
    windows = (len(tokens) - 1) // 10
    picked = [b["tokens"][:, 0] // 10 for b in data.eval_batches(tokens, 10, 8, max_batches=5, seed=3)]
    rows = np.concatenate(picked)
    assert len(rows) == 40 and len(set(rows.tolist())) == 40  # without replacement
    assert rows.min() < windows * 0.2 and rows.max() > windows * 0.8  # spread over the split, not its first windows
    again = np.concatenate([b["tokens"][:, 0] // 10 for b in data.eval_batches(tokens, 10, 8, max_batches=5, seed=3)])
    np.testing.assert_array_equal(rows, again)  # the same rows at every eval
    full = list(data.eval_batches(tokens, 10, 8, max_batches=10_000))
    assert sum(int(b["loss_mask"].sum()) for b in full) == windows * 10  # more batches than exist: a complete pass


def test_eval_batch_size_overrides_the_micro_batch(text, tmp_path):
    workdir = tmp_path / "w"
    evaluate = ["eval", "--workdir", workdir, "--data-dir", text["data_dir"]]
    # Two devices need a process of their own; the four commands share it.
    proc, ok, full, bad = run_calls(
        train_args(text, workdir, "--steps", "2", "--grad-accum", "2", "--batch-size", "4"),
        [*evaluate, "--batch-size", "2"], evaluate, [*evaluate, "--batch-size", "3"],
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert proc.returncode == 0, proc.stderr
    assert ok.returncode == 0, ok.stderr  # 2 rows over 2 devices (it divided by grad_accum before: 1 row)
    assert full.returncode == 0, full.stderr
    assert json.loads(ok.stdout)["loss"] == pytest.approx(json.loads(full.stdout)["loss"], rel=1e-5)
    assert_one_line_error(bad, "multiple of 2")


# ------------------------------------------------------------------------------------------ compile cache


def test_a_second_process_reuses_the_compiled_programs(tmp_path):
    cache = tmp_path / "jax-cache"
    args = ["generate", "--model", "tiny", "--random-init", "--prompt", "Hello", "--max-new-tokens", "8", "--temperature", "0"]
    # Every program is cached (threshold 0): which ones cross the default 0.2 s depends on the machine's load.
    env = {"AIGC_COMPILE_CACHE": str(cache), "AIGC_COMPILE_CACHE_MIN_SECONDS": "0"}
    first = run_cli(*args, env=env)
    assert first.returncode == 0, first.stderr
    entries = set(os.listdir(cache))
    assert entries  # the decode programs were written
    second = run_cli(*args, env=env)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert set(os.listdir(cache)) == entries  # every program was found: nothing new compiled
    off = run_cli("--no-compile-cache", *args, env={"AIGC_COMPILE_CACHE": str(tmp_path / "unused")})
    assert off.returncode == 0 and off.stdout == first.stdout and not (tmp_path / "unused").exists()


def test_final_params_unaffected_by_the_compile_cache(text, tmp_path):
    """Executables read back from the cache compute exactly what freshly compiled ones do."""
    corpus = text
    env = {"AIGC_COMPILE_CACHE": str(tmp_path / "cache")}
    for name in ("cold", "warm"):
        assert run_cli(*train_args(corpus, tmp_path / name, "--steps", "3"), env=env).returncode == 0
    a, b = final_params(tmp_path / "cold"), final_params(tmp_path / "warm")
    assert all(np.array_equal(a[k], b[k]) for k in a)
