"""Smoke tests of the benchmark harnesses (benchmarks/): each runs end to end on tiny shapes on the CPU and emits
the fields the report reads. No timing is asserted: timings live in benchmarks/, never in tests."""

import json
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT))

from benchmarks import bench, common, report, suite  # noqa: E402

TINY = dict(windows=1, steps_per_window=1, warmup=0)


def tiny_config(**overrides):
    return common.model_config("tiny", "float32", overrides)


@pytest.mark.parametrize("preset", ["tiny", "baby", "gpt2", "gpt2-xl", "llama-tiny", "llama-baby", "llama-3.2-1b",
                                    "llama-3-8b", "qwen2.5-7b"])
def test_flop_and_parameter_counts_match_the_model(preset):
    from aigc_jax import model

    cfg = common.model_config(preset)
    assert common.param_count(cfg) == model.param_count(cfg)
    assert common.flops_per_token(cfg, 128) == model.flops_per_token(cfg, 128)


def test_gpt2_counts_are_the_published_ones():
    cfg = common.model_config("gpt2")
    assert common.param_count(cfg) == 124_439_808  # HF's GPT2LMHeadModel (tied head counted once)
    moved = common.decode_step_bytes(cfg, 1, 16, 256, 2, 2)
    assert moved["weight_bytes"] == 2 * (124_439_808 - 1024 * 768 + (50304 - 50257) * 768)
    assert moved["kv_bytes"] == 2 * 12 * 1 * (16 + 128) * 768 * 2


def test_train_speed_runs_and_reports():
    from benchmarks import train_speed

    r = train_speed.measure(tiny_config(), 2, 16, peak_flops=1e12, **TINY)
    for key in ("tokens_per_s", "step_ms", "compile_s", "mfu", "flops_per_token", "compiled_bytes", "loss"):
        assert r[key] is not None, key
    assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1


def test_decode_speed_runs_and_reports():
    from benchmarks import decode_speed

    r = decode_speed.measure(tiny_config(), 2, 4, 6, repeats=1, peak_bw=1e10)
    for key in ("ms_per_token", "ms_per_token_e2e", "tokens_per_s", "prefill_ms", "compile_s", "total_bytes",
                "cache_slots"):
        assert r[key] is not None, key
    assert r["cache_slots"] == 32  # prompt and new tokens each bucketed to 16
    assert r["param_dtype"] == "float32"


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_peer_torch_train_and_generate(preset):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from benchmarks import peer_torch

    cfg = common.model_config(preset, "float32")
    r = peer_torch.train(cfg, 2, 16, peak_flops=1e12, **TINY)
    assert r["tokens_per_s"] > 0 and r["params"] == common.param_count(cfg)
    for cache in ("dynamic", "static"):
        g = peer_torch.generate(cfg, 2, 4, 6, cache=cache, repeats=1)
        assert g["tokens_per_s"] > 0 and g["cache"] == cache and g["compiled"] is False


def test_worker_records_failures_and_skips(capsys):
    records = bench.run_cases([{"bench": "train", "impl": "nope", "label": "x"}], group="g")
    assert records[0]["bench"] == "env" and "versions" in records[0]
    assert records[1]["ok"] is False and "unknown case" in records[1]["error"]
    skipped = bench.run_cases([{"bench": "peak", "impl": "jax"}], deadline=0.0)[1]
    assert "skipped" in skipped
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(printed) == 4


def test_worker_passes_measured_ceilings_to_later_cases():
    cases = [{"bench": "peak", "impl": "jax", "dtype": "float32", "opts": {"n": 64, "inner": 1, "repeats": 1}},
             {"bench": "train", "impl": "ours", "preset": "tiny", "batch": 2, "seq_len": 8, "opts": TINY}]
    records = bench.run_cases(cases)
    assert records[1]["ok"] and records[2]["ok"], records
    assert records[2]["mfu"] is not None


def _record(bench_, impl, value, **extra):
    r = {"bench": bench_, "impl": impl, "label": "baseline", "ok": True, "preset": "baby", "dtype": "float32",
         "batch": 1 if bench_ == "decode" else 8}
    if bench_ == "train":
        r.update(seq_len=256, tokens_per_s=value, step_ms=1.0, step_ms_min=1.0, step_ms_max=1.0)
    else:
        r.update(prompt_len=16, new_tokens=256, ms_per_token=value, ms_per_token_e2e=value, tokens_per_s=1 / value,
                 prefill_ms=1.0)
    return {**r, **extra}


def test_report_ratios_targets_levers_and_plots(tmp_path):
    records = [
        _record("train", "ours", 3000.0),
        _record("train", "hf_eager", 1500.0),
        _record("train", "ours", 3300.0, label="scan_layers", model={"scan_layers": True}),
        _record("decode", "ours", 1.0),
        _record("decode", "hf_dynamic", 6.0),
        {"bench": "train", "impl": "ours", "label": "remat dots", "preset": "baby", "skipped": "budget"},
    ]
    text = report.write(records, tmp_path, "t", "cpu")
    assert "2.00×" in text and "6.00×" in text  # ours ÷ HF tokens/s; HF ÷ ours ms/token
    assert text.count("| met |") == 2
    assert "+10.0%" in text and "scan_layers=True" in text
    assert "remat dots" in text.split("### Not measured")[1]
    assert {p.name for p in tmp_path.iterdir()} >= {"report.md", "train.png", "decode.png", "levers.png"}
    assert "6.00×" in report.summary(records, "cpu")


def test_runner_streams_records_and_skips_what_it_cannot_run(tmp_path):
    line = json.dumps({"bench": "data_throughput", "source": "s", "batch": 1, "seq_len": 2, "batches_per_s": 3.0,
                       "tokens_per_s": 6})
    runner = suite.Runner(tmp_path, total_budget_s=60, grace_s=5, min_start_s=1)
    runner.run([
        suite.Group("cmd", "data", 30, command=[sys.executable, "-c", f"print({line!r})"]),
        suite.Group("worker", "main", 30, [suite.case("peak", "nope")]),
    ])
    runner.deadline = 0  # the total budget is spent: the next group is skipped, saying so
    runner.run([suite.Group("late", "levers", 30, [suite.case("train", "ours", preset="tiny")])])
    runner.close()
    records = common.read_records([tmp_path / "results.jsonl"])
    assert [r["bench"] for r in records] == ["data_throughput", "env", "peak", "train"]
    assert records[2]["ok"] is False and records[2]["section"] == "main"
    assert "budget" in records[3]["skipped"]


def test_run_scripts_define_their_sets():
    from benchmarks import run_cpu, run_gpu

    cpu = run_cpu.build(quick=False)
    assert [g.section for g in cpu if not g.optional] == ["main", "main", "main", "main", "data", "levers"]
    llama = [c for g in cpu if g.name.endswith("-llama") for c in g.cases]
    assert {(c["bench"], c["impl"], c["preset"]) for c in llama} == {
        ("train", "ours", "llama-baby"), ("decode", "ours", "llama-baby"), ("train", "hf_eager", "llama-baby"),
        ("decode", "hf_dynamic", "llama-baby")}
    flags = [g for g in cpu if g.section == "flags"]
    assert flags[0].name == "flags-baseline" and not flags[0].xla_flags and all(g.xla_flags for g in flags[1:])
    gpu = run_gpu.build(quick=False)
    assert [g.section for g in gpu][:3] == ["main", "main", "main"]
    main_cases = [c for g in gpu[:3] for c in g.cases]
    assert {(c["bench"], c["impl"]) for c in main_cases} >= {
        ("train", "ours"), ("train", "hf_eager"), ("train", "hf_compile"), ("decode", "ours"),
        ("decode", "hf_dynamic"), ("decode", "hf_static"), ("peak", "jax")}
    llama = [c for g in gpu if g.section == "llama" for c in g.cases]
    assert {c["preset"] for c in llama} == {"llama-3.2-1b"} and {c["impl"] for c in llama} >= {"ours", "hf_eager"}
