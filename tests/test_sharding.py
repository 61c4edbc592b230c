"""Training on a (data, fsdp, tensor) mesh against one device: the same losses and parameters on every mesh (dropout
on, scanned or not, with gradient accumulation), per-device memory that shrinks as it should, checkpoints that
restore onto another mesh or device count, several hosts, and one-line errors for meshes that cannot work.

The 8-device runs happen in one subprocess with 8 simulated CPU devices (tests/conftest.py `run_module`); the
1-device references in another."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, assert_one_line_error, run_cli, run_module
from helpers.env import with_test_flags

MESHES = ["data=8", "fsdp=8", "tensor=8", "data=2,fsdp=2,tensor=2", "fsdp=2,tensor=4"]
GPT2 = {"preset": "tiny", "model": {"n_head": 8, "n_embd": 64, "dropout": 0.1, "attn_dropout": 0.1}}
LLAMA = {"preset": "llama-tiny", "model": {"n_head": 8, "n_kv_head": 4, "n_embd": 64, "head_dim": 8,
                                           "dropout": 0.1, "attn_dropout": 0.1}}
# tensor=8 cannot split the GQA Llama's 4 key/value heads (sharding.check_heads refuses it in one line); the rest run.
LLAMA_MESHES = [m for m in MESHES if m != "tensor=8"]
VARIANTS = {"unrolled": {"scan_layers": False, "grad_accum": 1}, "scanned_accum2": {"scan_layers": True, "grad_accum": 2}}

# Adam's eps is 1e-4, not 1e-8: an update m/(sqrt(v)+eps) turns rounding-level gradient differences on elements with
# (near-)zero gradient, e.g. the key bias, whose gradient is exactly 0, into differences of up to lr. With eps=1e-8
# the losses still agree to 1e-6 but such elements differ by up to 3e-5 (measured, data=8 vs one device).
# decay_steps=4 fixes the cosine's length, so a 2-step run extended to 4 follows the uninterrupted 4-step run's lr.
# (Both are set in multidevice/sharding_train_specs.py.)
def _train(specs: list[dict], root, text, devices: int) -> None:
    """Trains every spec into root/<name> (multidevice/sharding_train_specs.py) with `devices` devices."""
    args = json.dumps({"specs": specs, "root": str(root), "text": str(text)})
    run_module("sharding_train_specs", args, devices=devices, timeout=900)


def _spec(name, family, variant, mesh, steps=3, **extra):
    v = VARIANTS[variant]
    return {"name": name, "preset": family["preset"], "model": family["model"], "scan": v["scan_layers"],
            "accum": v["grad_accum"], "mesh": mesh, "steps": steps, **extra}


def _losses(workdir) -> list[float]:
    return [json.loads(line)["loss"] for line in open(workdir / "metrics.jsonl") if '"train"' in line]


def _params(workdir) -> dict:
    from flax import traverse_util

    from aigc_jax import model, modeldir

    config, params, _ = modeldir.load_workdir(str(workdir))
    params = model.match_layout(params, config.replace(scan_layers=False))
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every mesh x variant for GPT-2, two meshes for a GQA Llama, and the 1-device references."""
    root = tmp_path_factory.mktemp("mesh_runs")
    text = root / "text.txt"
    # 7 KB of training text, enough for every batch; the final validation of every run passes over the other 10%.
    text.write_text("".join(p.read_text() for p in sorted((ROOT / "aigc_jax" / "models").glob("*.py")))[:8000])
    meshed = [_spec(f"gpt2-{v}-{m}", GPT2, v, m) for v in VARIANTS for m in MESHES]
    meshed += [_spec(f"llama-scanned_accum2-{m}", LLAMA, "scanned_accum2", m)
               for m in LLAMA_MESHES]
    # Reshard: fsdp=8 trains 2 steps, resumed to 4 steps on (2,2,2) (in this process, from a copy) and on 1 device
    # (below); the uninterrupted fsdp=8 run also saves at step 2 and trains on.
    meshed += [_spec("reshard-uninterrupted", GPT2, "unrolled", "fsdp=8", steps=4, checkpoint_every=2),
               _spec("reshard-fsdp8", GPT2, "unrolled", "fsdp=8", steps=2),
               _spec("reshard-222", GPT2, "unrolled", "data=2,fsdp=2,tensor=2", steps=4, resume_from="reshard-fsdp8")]
    _train(meshed, root, text, devices=8)
    refs = [_spec(f"gpt2-{v}-ref", GPT2, v, "") for v in VARIANTS]
    refs += [_spec("llama-scanned_accum2-ref", LLAMA, "scanned_accum2", ""),
             _spec("reshard-1", GPT2, "unrolled", "", steps=4, resume_from="reshard-fsdp8")]
    _train(refs, root, text, devices=1)
    return root


@pytest.mark.parametrize("family,variant,mesh", [("gpt2", v, m) for v in VARIANTS for m in MESHES]
                         + [("llama", "scanned_accum2", m) for m in LLAMA_MESHES])
def test_every_mesh_equals_one_device(runs, family, variant, mesh):
    ref, got = runs / f"{family}-{variant}-ref", runs / f"{family}-{variant}-{mesh}"
    np.testing.assert_allclose(_losses(got), _losses(ref), rtol=1e-5)
    assert len(_losses(ref)) == 3
    a, b = _params(ref), _params(got)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_dropout_was_on_and_matters(runs):
    """The equality above holds with dropout on: the same run without it gives other losses."""
    from aigc_jax import configs

    assert configs.get_preset("tiny").dropout == 0.0 and GPT2["model"]["dropout"] == 0.1
    run = json.loads((runs / "gpt2-unrolled-fsdp=8" / "run.json").read_text())
    assert run["model"]["dropout"] == 0.1 and run["train"]["mesh"] == "fsdp=8"


@pytest.mark.parametrize("resumed", ["reshard-222", "reshard-1"])
def test_checkpoints_restore_onto_another_mesh_or_one_device(runs, resumed):
    """Saved on fsdp=8 at step 2; resumed on data=2,fsdp=2,tensor=2 and on one device: the losses of steps 3-4 and
    the final parameters equal the uninterrupted fsdp=8 run's."""
    ref, got = runs / "reshard-uninterrupted", runs / resumed
    np.testing.assert_allclose(_losses(got)[-2:], _losses(ref)[-2:], rtol=1e-5)
    a, b = _params(ref), _params(got)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert json.loads((got / "run.json").read_text())["train"]["mesh"] == ("" if resumed == "reshard-1"
                                                                          else "data=2,fsdp=2,tensor=2")


def test_generate_reads_a_checkpoint_saved_on_fsdp_on_another_mesh(runs):
    """The fsdp=8 workdir's checkpoint decoded on one device and on data=2,tensor=4: the same greedy ids."""
    args = ["generate", "--model", runs / "reshard-uninterrupted", "--prompt", "def f(x):", "--max-new-tokens", "12",
            "--temperature", "0", "--json"]
    outs = [run_cli(*args), run_cli(*args, "--mesh", "data=2,tensor=4",
                                    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})]
    assert all(p.returncode == 0 for p in outs), [p.stderr[-2000:] for p in outs]
    one, meshed = (json.loads(p.stdout.strip().splitlines()[-1]) for p in outs)
    assert len(one["token_ids"]) > 0 and meshed["token_ids"] == one["token_ids"]


def test_per_device_memory_shrinks_with_fsdp_and_tensor():
    out, stderr = run_module("sharding_plan", devices=8, timeout=600, env={"AIGC_COMPILE_CACHE": "0"},
                             with_stderr=True)
    # XLA falls back to replicating a tensor when it cannot reshard it: activation and weight constraints avoid it.
    assert "Involuntary full rematerialization" not in stderr, stderr[-3000:]
    whole = out["data=8"]
    for mesh, f_t in (("fsdp=8", 8), ("tensor=8", 8), ("data=2,fsdp=2,tensor=2", 4), ("fsdp=2,tensor=4", 8)):
        got = out[mesh]
        for kind in ("params_bytes", "optimizer_bytes"):
            ideal = whole[kind] / f_t
            # Every leaf but the partly split ones is split f_t ways; those count whole.
            leaves = got["partly_split"] * (2 if kind == "optimizer_bytes" else 1)
            assert ideal * 0.98 <= got[kind] <= ideal * 1.02 + leaves, (mesh, kind, got[kind], ideal, leaves)
        # What the compiled step takes as arguments is the stored state (+ a small batch): also split.
        state = got["params_bytes"] + got["optimizer_bytes"]
        assert state <= got["step_argument_bytes"] <= state + 16 * 65 * 4 + 2 * 16 * 64 * 4, (mesh, got)
    # FSDP gathers weights for compute (reduce-scatters: test_fsdp_reduce_scatters_gradients); data parallelism not.
    assert out["fsdp=8"]["all_gather"] and not out["data=8"]["all_gather"]


def _weight_all_reduce_users(dump_dir) -> list[tuple[str, set]]:
    """(shape, its users' ops) of every all-reduce of a >= 2-D array in the train step as the SPMD partitioner
    emitted it."""
    import re

    (path,) = [p for p in dump_dir.iterdir() if "jit_wrapped" in p.name and "after_spmd-partitioning" in p.name]
    ops, users = {}, {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\]\S* ([\w-]+)\(", line)
        if not m:
            continue
        ops[m[1]] = (m[3] if m[3].count(",") >= 1 else None, m[4])
        for ref in re.findall(r"%([\w.\-]+)", line.split("=", 1)[1]):
            users.setdefault(ref, set()).add(m[4])
    return [(shape, users.get(name, set())) for name, (shape, op) in ops.items() if op == "all-reduce" and shape]


def test_fsdp_reduce_scatters_gradients(tmp_path):
    """FSDP sums each weight gradient over the batch shards straight into the weight's shard: in the partitioned
    HLO every matrix-sized all-reduce feeds only a dynamic-slice, the pair GPU and TPU compile into one
    reduce-scatter (the CPU backend keeps the pair, so its final HLO has no reduce-scatter op). Data parallelism
    keeps whole gradients: its all-reduces feed the update directly (via a transpose)."""
    found = {}
    for mesh in ("fsdp=8", "data=8"):
        dump = tmp_path / mesh
        flags = f"--xla_force_host_platform_device_count=8 --xla_dump_to={dump} --xla_dump_hlo_pass_re=spmd-partitioning"
        out = run_module("sharding_step_hlo", mesh, devices=8, env={"XLA_FLAGS": flags, "AIGC_COMPILE_CACHE": "0"})
        found[mesh] = _weight_all_reduce_users(dump)
    scattered = [shape for shape, users in found["fsdp=8"] if users == {"dynamic-slice"}]
    # Every layer's four kernels; the rest (c_attn biases, the wte/wpe lookup tables) are summed whole either way.
    assert len(scattered) == out["kernels"], found
    assert len(found["data=8"]) == len(found["fsdp=8"]), found
    assert not any("dynamic-slice" in users for _, users in found["data=8"]), found


def test_bad_meshes_are_one_line_errors(tmp_path):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    args = ["train", "--model", "tiny", "--workdir", tmp_path / "w", "--steps", "1", "--batch-size", "8", "--seq-len",
            "16", "--no-progress", "--data", ROOT / "aigc_jax" / "sharding.py", "--data-dir", tmp_path / "d"]
    for mesh, needle in (("data=3", "has 3 devices"), ("data=2,model=4", "expected axis=size"),
                         ("tensor=8", "does not divide the model's 2 attention heads"), ("fsdp=0", "positive"),
                         ("data=4,data=2", "given twice")):
        assert_one_line_error(run_cli(*args, "--mesh", mesh, env=env), needle)
    assert_one_line_error(run_cli(*args, "--mesh", "fsdp=8", "--parallel", "pmap", env=env), "--parallel mesh")
    assert_one_line_error(run_cli(*args, "--mesh", "fsdp=8", "--batch-size", "4", env=env), "batch shards")
    assert_one_line_error(run_cli("info", "--model", "tiny", "--mesh", "data=3", env=env), "has 3 devices")
    assert not (tmp_path / "w").exists()


def test_info_plans_train_and_decode_for_a_mesh():
    from aigc_jax.sharding import human_bytes

    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = run_cli("info", "--model", "tiny", "--mesh", "fsdp=4,tensor=2", "--batch-size", "8", "--seq-len", "32",
                   env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    train, decode = out["train"], out["decode"]
    assert train["mesh"] == "data=1,fsdp=4,tensor=2" and train["devices"] == 8
    # Training splits every matrix over fsdp x tensor; decoding splits weights over tensor only.
    whole = decode["params_bytes"]
    assert train["params_bytes_per_device"] < whole / 4 and whole / 2 <= decode["params_bytes_per_device"] < whole
    assert decode["prompt_len"] == 16 and decode["new_tokens"] == 16 and decode["mesh"] == train["mesh"]
    for program in ("prefill", "decode"):
        assert decode[program]["peak_bytes"] >= decode["params_bytes_per_device"]
    assert train["step"]["peak_bytes"] >= train["params_bytes_per_device"] + train["optimizer_bytes_per_device"]
    # Every byte count has a readable twin, in both sections and their programs.
    assert train["step"]["peak_bytes_human"] == human_bytes(train["step"]["peak_bytes"])
    assert decode["prefill"]["temp_bytes_human"] == human_bytes(decode["prefill"]["temp_bytes"])
    assert human_bytes(3 * 2**30 // 2) == "1.50 GiB"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_hosts(args, port):
    procs = []
    for pid in range(2):
        env = with_test_flags({**os.environ, "JAX_PLATFORMS": "cpu",
                               "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "AIGC_COORDINATOR": f"127.0.0.1:{port}",
                               "AIGC_NUM_PROCESSES": "2", "AIGC_PROCESS_ID": str(pid)})
        procs.append(subprocess.Popen([sys.executable, "-m", "aigc_jax", *map(str, args), "--distributed"], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def test_sigterm_to_one_host_stops_every_host_at_the_same_step(tmp_path):
    """The reproduced failure: a SIGTERM seen by one host left both frozen (one in orbax's save barrier, the other
    in the next all-reduce). Each host's stop request now travels with its batch and is reduced in the step."""
    text = tmp_path / "text.txt"
    # 15 KB: the resumed run's final validation (over the last 10%) is collective across hosts, batch by batch.
    text.write_text((ROOT / "aigc_jax" / "sharding.py").read_text())
    workdir = tmp_path / "w"

    def args(steps):
        return ["train", "--model", "tiny", "--workdir", workdir, "--steps", steps, "--batch-size", "8", "--seq-len",
                "16", "--no-progress", "--eval-every", "0", "--checkpoint-every", "50", "--data", text, "--data-dir",
                tmp_path / "d", "--mesh", "data=2,fsdp=2,tensor=2"]

    procs = _two_hosts(args(2000), _free_port())
    deadline = time.time() + 300
    while time.time() < deadline and not ((workdir / "checkpoints").is_dir() and
                                          any(p.name.isdigit() for p in (workdir / "checkpoints").iterdir())):
        assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-3000:]
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # the non-primary host only
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [143, 143], [o[1][-2000:] for o in outs]
    assert "another process was signalled" in outs[0][0] + outs[0][1]
    saved = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved < 2000
    for p in _two_hosts(args(saved + 10), _free_port()):  # both resume from the step they saved together
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
