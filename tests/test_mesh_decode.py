"""Decoding and serving on a (data, fsdp, tensor) mesh of 8 simulated CPU devices, each test in its own subprocess:
ids identical to one device for GPT-2 and a grouped-query Llama on every mesh shape; no collective that moves the
KV cache in the compiled decode loop (with a control that does); per-device memory of the compiled programs against
arithmetic; `generate --mesh`, the serving engine and `aigc-jax serve --mesh` against one device; bad meshes are
one-line errors."""

import json

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli, run_module
from serve_util import ServerProcess, call

from aigc_jax import api
from aigc_jax.cli import main as cli_main

# Every run in a subprocess uses the same flags (the one-device references too), so the comparisons are unaffected
# by the faster, less optimised compiles.
ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"}
MESHES = ("data=8", "fsdp=8", "tensor=8", "data=2,fsdp=2,tensor=2", "fsdp=2,tensor=4")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_and_beam_ids_on_every_mesh_equal_one_device(family):
    out = run_module("mesh_decode_ids", family, json.dumps(MESHES), devices=8, env=ENV)
    one = out.pop("one")
    assert len({len(ids) for ids in one["greedy"]}) > 1 or family == "gpt2"  # llama: some rows end at EOS
    for m in MESHES:
        assert out[m] == {"greedy": one["greedy"], "beam": one["beam"]}, m
    assert one["greedy"] != one["beam"]
    if family == "gpt2":
        assert out["stream"] == one["sample"] and one["sample"] != one["greedy"]
        assert "tensor=4 does not divide the model's 2 attention heads" in out["heads_error"]
    else:
        assert "tensor=4 does not divide the model's 2 key/value heads" in out["heads_error"]
    assert "\n" not in out["heads_error"]


@pytest.fixture(scope="module")
def planned():
    return run_module("mesh_decode_plan", json.dumps(["data=8", "tensor=8", "fsdp=2,tensor=4"]), devices=8,
                      env=ENV)


def test_decode_loop_never_moves_the_kv_cache(planned):
    hlo = planned["hlo"]
    for strategy in ("greedy", "beam"):
        assert hlo[strategy]["n"] > 0  # the tensor-parallel all-reduces are there: collectives are parsed
        assert hlo[strategy]["cache"] == [], strategy
    # The detector sees the cache move when beams are reordered by global row numbers instead of within groups.
    assert any(c.startswith("all-gather") for c in hlo["control"]["cache"]), hlo["control"]


# The GPT-2 of multidevice/mesh_decode_plan.py: width 64, 2 layers, 8 heads of 8, padded vocabulary 128,
# 64 positions, fp32.
D, L, V, POSITIONS, H, DH = 64, 2, 128, 64, 8, 8
SPLIT = L * (D * 3 * D + 3 * D + D * D + D * 4 * D + 4 * D + 4 * D * D) + V * D  # heads, mlp, vocab: over tensor
WHOLE = POSITIONS * D + L * (2 * 2 * D + D + D) + 2 * D  # position table, norms, the two c_proj biases


def _cache_bytes(rows, slots, row_split, tensor):
    kv = 2 * L * rows * H * DH * slots * 4 // (row_split * tensor)
    return kv + rows * slots * 4 // row_split + 4  # + positions [rows, slots] int32 + the scalar write index


@pytest.mark.parametrize("mesh,row_split,tensor", [("data=8", 8, 1), ("tensor=8", 1, 8), ("fsdp=2,tensor=4", 2, 4)])
def test_memory_report_matches_arithmetic_and_the_placed_arrays(planned, mesh, row_split, tensor):
    r = planned["report"][mesh]
    assert (r["batch"], r["prompt_len"], r["new_tokens"], r["cache_slots"]) == (8, 16, 32, 48)  # the buckets
    assert r["param_bytes"] == 4 * (SPLIT + WHOLE)
    assert r["param_bytes_per_device"] == 4 * (SPLIT // tensor + WHOLE) == planned["placed"][mesh]
    assert r["kv_cache_bytes_per_device"] == _cache_bytes(8, 48, row_split, tensor)
    assert r["kv_cache_bytes"] == _cache_bytes(8, 48, 1, 1)
    held = r["param_bytes_per_device"] + r["kv_cache_bytes_per_device"]
    for program in ("prefill", "decode"):
        assert set(r[program]) == {"argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "peak_bytes"}
    # XLA's own figures: the loop's arguments are the params, the cache and a few small per-row arrays; the state
    # (cache included) is donated, so its output aliases its input.
    assert 0 <= r["decode"]["argument_bytes"] - held < 16 * 1024
    assert r["decode"]["alias_bytes"] >= r["kv_cache_bytes_per_device"]
    assert r["prefill"]["output_bytes"] >= r["kv_cache_bytes_per_device"]
    assert r["prefill"]["argument_bytes"] >= r["param_bytes_per_device"]


def test_memory_report_of_beam_search_counts_every_beam(planned):
    r = planned["beams"]
    assert (r["batch"], r["num_beams"]) == (4, 2)  # 3 prompts, bucketed to 4 (tensor=8 splits no rows)
    assert r["kv_cache_bytes_per_device"] == _cache_bytes(4 * 2, 48, 1, 8)


# ------------------------------------------------------------------------------------------------- CLI and API


def test_bad_meshes_are_one_line_errors(capsys):
    def error(*args, command=("generate", "--prompt", "hi")):
        rc = cli_main([command[0], "--model", "tiny", "--random-init", *command[1:], *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc != 0 and len(err) == 1, err
        return err[0]

    assert "expected axis=size items with axes data, fsdp, tensor" in error("--mesh", "pipe=1")
    assert "expected axis=size items" in error("--mesh", "pipe=1", command=("serve",))
    assert "the product of the axes must equal the device count" in error("--mesh", "data=2")
    assert "drop --parallel pmap" in error("--mesh", "data=1", "--parallel", "pmap")
    with pytest.raises(api.UserError, match="must be a positive integer"):
        api.load("tiny", mesh="tensor=0", random_init=True)


def test_cli_generate_on_a_mesh_equals_one_device(serve_model):
    prompts = ["Hello", "Once upon a time", "x"]
    args = ["generate", "--model", serve_model, "--max-new-tokens", "12", "--temperature", "0", "--json",
            *sum((["--prompt", p] for p in prompts), [])]
    proc = run_cli(*args, "--mesh", "data=2,fsdp=2,tensor=2", env=ENV)
    assert proc.returncode == 0, proc.stderr
    lm = api.load(str(serve_model))  # one device, in this process
    assert [json.loads(line)["token_ids"] for line in proc.stdout.splitlines()] == \
        [lm.generate_ids(p, max_new_tokens=12, temperature=0) for p in prompts]
    # The tiny model has 2 heads: tensor=8 cannot split them.
    assert_one_line_error(run_cli("generate", "--model", serve_model, "--prompt", "hi", "--mesh", "tensor=8", env=ENV),
                          "tensor=8 does not divide the model's 2 attention heads")


# ------------------------------------------------------------------------------------------------- serving

def test_engine_on_a_mesh_serves_what_one_device_serves():
    out = run_module("mesh_engine", "data=2,fsdp=2,tensor=2", devices=8, env=ENV)
    one, mesh = out["one"], out["mesh"]
    assert "--max-batch 6 must be a multiple of data x fsdp = 4" in out["slots_error"]
    assert mesh["tokens"] == one["tokens"]
    assert mesh["logprobs"].keys() == one["logprobs"].keys()
    for key, lp in one["logprobs"].items():  # tensor-parallel sums round differently in the last bits
        np.testing.assert_allclose(mesh["logprobs"][key], lp, rtol=1e-4, atol=1e-5)


def test_serve_cli_on_a_mesh_equals_one_device(serve_model, tmp_path):
    prompts = ["Hello world", "The meaning of life is", "x", "Once upon a time, in a land far away"]
    server = ServerProcess(serve_model, "--mesh", "data=2,fsdp=2,tensor=2", "--max-batch", "4", "--no-warmup",
                           log=tmp_path / "server.log", env=ENV)
    try:
        server.wait_ready(timeout=180)
        r = call(server.url, "POST", "/v1/completions", {"model": "tiny-gpt2", "prompt": prompts, "max_tokens": 12,
                                                          "temperature": 0}, timeout=180)
        assert r.status == 200, r.body
        texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    finally:
        assert server.stop() == 0, server.output()[-3000:]
    # One device, offline: what the single-device server answers (tests/test_serve_api.py).
    assert texts == api.load(str(serve_model)).generate(prompts, max_new_tokens=12, temperature=0)
