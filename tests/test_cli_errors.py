"""Researcher mistakes at the command line: each is one line on stderr, a non-zero exit, no traceback, and leaves
what is already on disk as it was (and writes nothing where it refuses to run)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_cli
from conftest import cli_in_process as cli

TINY = ["--model", "tiny", "--batch-size", "8", "--seq-len", "32", "--eval-every", "0", "--no-progress"]


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A corpus, a tiny model dir, and a training workdir whose latest checkpoint is corrupt (written directly,
    without a training run)."""
    import jax

    from aigc_jax import configs, model, modeldir
    from aigc_jax import tokenizers as tok
    from aigc_jax.train import optimizer
    from aigc_jax.checkpoints import Checkpoints
    from aigc_jax.train.config import TrainConfig
    from aigc_jax.train.step import init_state

    root = tmp_path_factory.mktemp("cli_errors")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(p.read_text() for p in sorted((Path(__file__).parents[1] / "aigc_jax").glob("*.py"))))
    config = configs.get_preset("tiny")
    params = model.init_params(config, jax.random.key(0))
    modeldir.save_model_dir(str(root / "model"), config, params, tok.byte_level())
    workdir = root / "workdir"
    modeldir.save_config(str(workdir), config)
    tok.byte_level().save(str(workdir))
    checkpoints = Checkpoints(str(workdir), async_save=False)
    checkpoints.save(1, init_state(params, optimizer.make(TrainConfig()), 0), {"step": 1})
    checkpoints.close()
    manifest = workdir / "checkpoints" / "1" / "params" / "manifest.ocdbt"
    manifest.write_bytes(b"\0" * manifest.stat().st_size)
    return {"root": root, "data": str(corpus), "data_dir": str(root / "data"), "model": root / "model",
            "workdir": workdir}


def train(tiny, workdir, *extra, timeout=120):
    return run_cli("train", *TINY, "--data", tiny["data"], "--data-dir", tiny["data_dir"], "--workdir", workdir,
                   "--steps", "2", *extra, timeout=timeout)


def test_config_file_that_is_not_a_mapping(tiny, tmp_path):
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "section.json").write_text('{"train": 5}')
    assert_one_line_error(train(tiny, tmp_path / "run", "--config", tmp_path / "list.json"), "list.json", "object")
    assert_one_line_error(train(tiny, tmp_path / "run", "--config", tmp_path / "section.json"), "'train'")
    assert not (tmp_path / "run").exists()


def test_errors_found_late_write_nothing(tiny, tmp_path):
    """Formerly raised after run.json was written, so the corrected command was refused as "a different run"."""
    (tmp_path / "short.txt").write_text("hi")
    assert_one_line_error(train(tiny, tmp_path / "a", "--seed", "-1"), "seed must be >= 0")
    assert not (tmp_path / "a").exists()
    assert_one_line_error(run_cli("train", *TINY, "--data", tmp_path / "short.txt", "--data-dir", tiny["data_dir"],
                                  "--workdir", tmp_path / "b", "--steps", "2"), "fewer than one window")
    assert not (tmp_path / "b").exists()
    assert_one_line_error(train(tiny, tmp_path / "c", "--lr", "inf"), "train.lr must be a finite number")
    assert not (tmp_path / "c").exists()


def test_workdir_that_is_or_holds_a_file(tiny, tmp_path):
    (tmp_path / "file").write_text("mine")
    assert_one_line_error(train(tiny, tmp_path / "file"), "is a file")
    assert_one_line_error(train(tiny, tmp_path / "file" / "run"), "is a file")
    assert (tmp_path / "file").read_text() == "mine"
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "checkpoints").write_text("mine")  # formerly: orbax hung with background-thread tracebacks
    before = snapshot(workdir)
    assert_one_line_error(train(tiny, workdir, timeout=60), "checkpoints")
    assert snapshot(workdir) == before


def test_flag_values(capsys, tmp_path):
    nope = tmp_path / "nope"
    assert_one_line_error(cli(capsys, "eval", "--workdir", nope, "--batch-size", "0"), "--batch-size must be >= 1")
    assert_one_line_error(cli(capsys, "eval", "--workdir", nope, "--max-batches", "-1"), "--max-batches")
    assert_one_line_error(cli(capsys, "info", "--model", "tiny", "--seq-len", "0"), "--seq-len")
    gen = ["generate", "--model", "tiny", "--random-init", "--prompt", "hi", "--max-new-tokens", "2"]
    assert_one_line_error(cli(capsys, *gen, "--temperature", "inf"), "--temperature")
    assert_one_line_error(cli(capsys, *gen, "--num-beams", "2", "--length-penalty", "nan"), "--length-penalty")
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert_one_line_error(cli(capsys, "generate", "--model", "tiny", "--random-init", "--prompts-file", tmp_path / "blank.txt"),
                          "blank.txt has no prompts")


def test_broken_model_sources(tiny, tmp_path):
    md = tiny["model"]
    no_params = tmp_path / "no_params"
    no_params.mkdir()
    (no_params / "model.json").write_bytes((md / "model.json").read_bytes())
    assert_one_line_error(run_cli("generate", "--model", no_params, "--prompt", "hi"), "params.safetensors")
    bad_tok = tmp_path / "bad_tok"
    bad_tok.mkdir()
    for name in ("model.json", "params.safetensors"):
        (bad_tok / name).write_bytes((md / name).read_bytes())
    (bad_tok / "tokenizer.json").write_text("garbage")  # formerly reported as "has no tokenizer"
    assert_one_line_error(run_cli("generate", "--model", bad_tok, "--prompt", "hi"), "tokenizer.json")
    (tmp_path / "file").write_text("mine")
    assert_one_line_error(run_cli("convert", "--to-hf", md, "--out", tmp_path / "file" / "hf"), "is a file")
    assert (tmp_path / "file").read_text() == "mine"


def test_corrupt_checkpoint_is_one_line_without_background_tracebacks(tiny):
    before = snapshot(tiny["workdir"])
    assert_one_line_error(run_cli("generate", "--model", tiny["workdir"], "--prompt", "hi"), "is unreadable")
    assert snapshot(tiny["workdir"]) == before


# ------------------------------------------------------------------------------------------ presets are not weights


def test_a_preset_where_weights_are_expected_is_an_error_unless_random_weights_are_asked_for(capsys, tmp_path):
    """Presets share names with hub ids ("gpt2"): where trained weights are expected, running one silently would
    hand back random weights."""
    from aigc_jax import api

    gen = ["--prompt", "hi", "--max-new-tokens", "2", "--temperature", "0"]
    assert_one_line_error(cli(capsys, "generate", "--model", "gpt2", *gen), "'gpt2' is a preset", "--random-init")
    assert_one_line_error(cli(capsys, "serve", "--model", "tiny", "--port", "0"), "'tiny' is a preset",
                          "--random-init")
    assert_one_line_error(cli(capsys, "convert", "--to-hf", "tiny", "--out", tmp_path / "hf"), "'tiny' is a preset")
    assert_one_line_error(cli(capsys, "train", "--init-from", "tiny", "--workdir", tmp_path / "w"),
                          "'tiny' is a preset", "--model tiny")
    with pytest.raises(api.UserError, match="random_init=True"):
        api.load("tiny")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "w").exists()

    ok = cli(capsys, "generate", "--model", "tiny", "--random-init", *gen)
    assert ok.returncode == 0, ok.stderr
    assert api.load("tiny", random_init=True).config == api.configs.get_preset("tiny")
    assert_one_line_error(cli(capsys, "generate", "--model", tmp_path, "--random-init", *gen), "takes a preset name")


def test_every_train_flag_says_its_default():
    from aigc_jax.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if a.dest == "command"]
    train = sub.choices["train"]
    flags = [a for a in train._actions if a.option_strings and a.dest not in ("help", "workdir")]
    assert len(flags) > 20
    for action in flags:
        assert "default" in (action.help or ""), action.option_strings
    assert "(default: 0.0006)" in train.format_help().replace("\n", " ").replace("  ", " ")
