"""JSON lines -> a markdown report (our/peer ratios, targets, levers, what was skipped) and matplotlib PNG plots.

    python benchmarks/report.py results.jsonl [more.jsonl …] [--out DIR] [--targets cpu|gpu]

Ratios: training "ours ÷ peer" of tokens/s (> 1: we are faster); decoding "peer ÷ ours" of ms/token (> 1: we are
faster). Levers compare a variant with the baseline of the same bench, model and shape from the same run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

# The project's speed targets. ratio_to: ours ÷ that impl's metric (tokens/s) or that impl's ÷ ours (ms/token).
TARGETS = {
    "gpu": [
        {"name": "train GPT-2 124M B16×T1024 tokens/s ≥ 520K", "bench": "train", "preset": "gpt2", "batch": 16,
         "metric": "tokens_per_s", "min": 520e3},
        {"name": "train GPT-2 124M ≥ 1.5× HF compile (same run)", "bench": "train", "preset": "gpt2", "batch": 16,
         "metric": "tokens_per_s", "ratio_to": "hf_compile", "min": 1.5},
        {"name": "train GPT-2 XL B8×T1024 MFU ≥ 52%", "bench": "train", "preset": "gpt2-xl", "batch": 8,
         "metric": "mfu", "min": 0.52},
        {"name": "decode batch 1 ≤ 0.25 ms/token (must: ≤ 0.5)", "bench": "decode", "preset": "gpt2", "batch": 1,
         "metric": "ms_per_token", "max": 0.25},
        {"name": "decode batch 64 ≥ 250K tokens/s", "bench": "decode", "preset": "gpt2", "batch": 64,
         "metric": "tokens_per_s", "min": 250e3},
    ],
    "cpu": [
        {"name": "train baby tokens/s ≥ 1.2× HF eager (same run)", "bench": "train", "preset": "baby",
         "metric": "tokens_per_s", "ratio_to": "hf_eager", "min": 1.2},
        {"name": "decode baby batch 1 ms/token ≥ 3× faster than HF generate (same run)", "bench": "decode",
         "preset": "baby", "batch": 1, "metric": "ms_per_token", "ratio_to": "hf_dynamic", "min": 3.0},
        {"name": "train llama-baby tokens/s ≥ 1.2× HF eager (same run)", "bench": "train", "preset": "llama-baby",
         "metric": "tokens_per_s", "ratio_to": "hf_eager", "min": 1.2},
        {"name": "decode llama-baby batch 1 ms/token ≥ 3× faster than HF generate (same run)", "bench": "decode",
         "preset": "llama-baby", "batch": 1, "metric": "ms_per_token", "ratio_to": "hf_dynamic", "min": 3.0},
    ],
}
# ModelConfig knobs that only change how our implementation runs (HF ignores them).
OURS_ONLY = ("attention", "scan_layers", "remat", "vocab_multiple")
TRAIN_IMPLS = ("ours", "hf_eager", "hf_compile", "hf_compile_regional")
DECODE_IMPLS = ("ours", "hf_dynamic", "hf_static", "hf_static_eager")


def ok(records, **match) -> list[dict]:
    """Successful records whose fields equal `match` (label defaults to "baseline", XLA flags to none)."""
    match.setdefault("label", "baseline")
    out = []
    for r in records:
        if not r.get("ok"):
            continue
        if all(r.get(k) == v for k, v in match.items()):
            out.append(r)
    return out


def shape_key(r: dict) -> tuple:
    """What makes two records comparable: model, dtype and shape (knobs only our side has are left out)."""
    model = tuple(sorted((k, str(v)) for k, v in (r.get("model") or {}).items() if k not in OURS_ONLY))
    return (r.get("preset"), r.get("dtype"), model, r.get("batch"), r.get("seq_len"), r.get("prompt_len"),
            r.get("new_tokens"))


def _fmt(x, digits=1, pct=False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.{digits}f}%" if pct else f"{x:,.{digits}f}"


def _gib(x) -> str:
    return "–" if not x else f"{x / 2**30:.1f}"


def _shape(r: dict) -> str:
    if r["bench"] == "train":
        text = f"{r['preset']} {r['dtype']} B{r['batch']}×T{r['seq_len']}"
    else:
        text = f"{r['preset']} {r['dtype']} B{r['batch']} prompt {r['prompt_len']} + {r['new_tokens']} new"
    if r.get("label", "baseline") == "baseline":
        model = {k: v for k, v in (r.get("model") or {}).items() if r["impl"] == "ours" or k not in OURS_ONLY}
        text += "".join(f" {k}={v}" for k, v in model.items())
    return text


def _by_shape(records, bench) -> dict[tuple, dict[str, dict]]:
    table: dict[tuple, dict[str, dict]] = {}
    for r in ok(records, bench=bench):
        table.setdefault(shape_key(r), {})[r["impl"]] = r
    return table


def _table(title: str, header: list[str], rows: list[list], note: str = "") -> list[str]:
    """A markdown section: "### title", the table, an optional note; nothing at all without rows."""
    if not rows:
        return []
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + (["", note] if note else []) + [""]


def _ratio(x) -> str:
    return f"{x:.2f}×" if x else ""


def ceilings_table(records) -> list[str]:
    rows = [[f"{r['impl']} matmul {r['dtype']} n={r['n']}", f"{r['flops_per_s'] / 1e12:,.1f} TFLOP/s"]
            for r in ok(records, bench="peak")]
    rows += [[f"jax elementwise copy {r['megabytes']} MB (read + write)", f"{r['bytes_per_s'] / 1e9:,.0f} GB/s"]
             for r in ok(records, bench="bandwidth")]
    return _table("Ceilings measured in this run", ["measure", "value"], rows)


def train_table(records) -> list[str]:
    rows = []
    for impls in _by_shape(records, "train").values():
        ours = impls.get("ours")
        for impl in [i for i in TRAIN_IMPLS if i in impls]:
            r = impls[impl]
            ratio = ours["tokens_per_s"] / r["tokens_per_s"] if ours and impl != "ours" else None
            rows.append([_shape(r), impl, _fmt(r["tokens_per_s"], 0),
                         f"{_fmt(r['step_ms'])} ({_fmt(r['step_ms_min'])}–{_fmt(r['step_ms_max'])})",
                         _fmt(r.get("mfu"), pct=True), _fmt(r.get("mfu_datasheet"), pct=True),
                         _fmt(r.get("compile_s")), _gib(r.get("compiled_bytes") or r.get("peak_bytes")), _ratio(ratio)])
    return _table("Training step", ["shape", "impl", "tokens/s", "step ms (min–max)", "MFU (measured peak)",
                                    "MFU (datasheet)", "compile s", "memory GiB", "ours ÷ impl"], rows,
                  "memory: ours = the compiled step's arguments + temporaries + outputs − donated; "
                  "HF = torch.cuda.max_memory_allocated (– on CPU).")


def decode_table(records) -> list[str]:
    rows = []
    for _, impls in sorted(_by_shape(records, "decode").items(), key=lambda kv: (str(kv[0][0]), kv[0][3] or 0)):
        ours = impls.get("ours")
        for impl in [i for i in DECODE_IMPLS if i in impls]:
            r = impls[impl]
            ratio = r["ms_per_token"] / ours["ms_per_token"] if ours and impl != "ours" and ours["ms_per_token"] else None
            bw = _fmt(r.get("achieved_gbps"), 0)
            if r.get("bandwidth_fraction"):
                bw += f" ({100 * r['bandwidth_fraction']:.0f}%)"
            rows.append([_shape(r), impl, _fmt(r["ms_per_token"], 3), _fmt(r["ms_per_token_e2e"], 3),
                         _fmt(r["tokens_per_s"], 0), _fmt(r["prefill_ms"], 2), bw, _fmt(r.get("compile_s")),
                         _ratio(ratio)])
    return _table("Decoding (greedy, EOS off)", ["shape", "impl", "ms/token (decode step)", "ms/token (end to end)",
                                                 "tokens/s", "prefill ms", "GB/s (of copy peak)", "compile s",
                                                 "impl ÷ ours (ms/token)"], rows,
                  "ms/token (decode step) = (time for N new tokens − time for 1) / (N − 1), same for both sides; "
                  "GB/s = weights + the KV cache of the tokens so far, per step.")


def _baseline_for(records, r) -> dict | None:
    same = [b for b in ok(records, bench=r["bench"], impl=r["impl"]) if shape_key(b) == shape_key(r)]
    return same[0] if same else None


def _setting(r: dict, base: dict | None) -> str:
    """What the variant changes relative to its baseline: model overrides, harness options, XLA flags."""
    base = base or {}
    parts = []
    for field in ("model", "opts"):
        mine, theirs = r.get(field) or {}, base.get(field) or {}
        parts += [f"{k}={v}" for k, v in mine.items() if theirs.get(k) != v]
    if r.get("xla_flags_extra"):
        parts.append(r["xla_flags_extra"])
    return ", ".join(parts) or "–"


def lever_changes(records) -> list[tuple[dict, dict | None, str, float | None]]:
    """(variant, its baseline, metric, speed change: + = faster) for every successful non-baseline record."""
    out = []
    for r in records:
        if not r.get("ok") or r.get("label", "baseline") == "baseline" or r.get("bench") not in ("train", "decode"):
            continue
        base = _baseline_for(records, r)
        metric = "tokens_per_s" if r["bench"] == "train" else "ms_per_token"
        value, ref = r[metric], base[metric] if base else None
        change = (value / ref - 1 if metric == "tokens_per_s" else ref / value - 1) if ref and value else None
        out.append((r, base, metric, change))
    return out


def levers_table(records) -> list[str]:
    rows = []
    for r, base, metric, change in lever_changes(records):
        digits = 3 if metric == "ms_per_token" else 0
        rows.append([r["label"], f"{_shape(r)} {r['impl']}", _setting(r, base), metric, _fmt(r[metric], digits),
                     _fmt(base[metric] if base else None, digits),
                     "–" if change is None else f"{100 * change:+.1f}%", _fmt(r.get("compile_s")),
                     _fmt(base.get("compile_s") if base else None)])
    return _table("Levers (variant vs the baseline of the same run; + = faster)",
                  ["lever", "case", "setting", "metric", "variant", "baseline", "speed change", "compile s",
                   "baseline compile s"], rows)


def memory_table(records) -> list[str]:
    """Per-device memory the planner predicts (compiled step, `aigc-jax info`) next to what a run's process used."""
    rows = []
    for r in records:
        if not r.get("ok") or r.get("impl") != "ours" or r.get("bench") not in ("train", "plan"):
            continue
        planned = r.get("planned") or (r if r["bench"] == "plan" else None)
        if not planned or not planned.get("step_peak_bytes"):
            continue
        shape = f"{r['preset']} {r['dtype']} B{r['batch']}×T{r['seq_len']}"
        measured = r.get("process_peak_bytes") if r["bench"] == "train" else None
        rows.append([shape, r.get("label", "baseline"), r["bench"], planned.get("mesh") or r.get("mesh", "–"),
                     _gib(planned.get("params_bytes", 0) + planned.get("optimizer_bytes", 0)),
                     _gib(planned.get("step_temp_bytes")), _gib(planned["step_peak_bytes"]), _gib(measured),
                     _gib(r.get("device_bytes_limit"))])
    return _table("Memory per device: planned vs measured", ["shape", "label", "bench", "mesh",
                                                             "params + optimizer GiB", "planned temporaries GiB",
                                                             "planned peak GiB", "measured process peak GiB",
                                                             "device limit GiB"], rows,
                  "planned = the compiled step's arguments + outputs − donated + temporaries (memory_analysis); "
                  "measured = the device allocator's peak of the whole process (– where the backend has none); "
                  "plan rows compile only and run nothing.")


def data_table(records) -> list[str]:
    rows = [[r["source"], f"{r['batch']}×{r['seq_len']}", f"{r['batches_per_s']:,.1f}", f"{r['tokens_per_s']:,.0f}"]
            for r in records if r.get("bench") == "data_throughput"]
    return _table("Input pipeline (host)", ["source", "batch×seq", "batches/s", "tokens/s"], rows)


def _target_row(records, t: dict) -> list:
    match = {k: t[k] for k in ("bench", "preset", "batch") if k in t}
    ours = ok(records, impl="ours", **match)
    value = ours[0].get(t["metric"]) if ours else None
    if value is None:
        return [t["name"], "not measured", "–"]
    if "ratio_to" in t:
        peer = [p for p in ok(records, impl=t["ratio_to"], **match) if shape_key(p) == shape_key(ours[0])]
        if not peer or not value:
            return [t["name"], f"{t['ratio_to']} not measured", "–"]
        ref = peer[0][t["metric"]]
        value = value / ref if t["metric"] == "tokens_per_s" else ref / value
        shown = f"{value:.2f}×"
    elif t["metric"] == "mfu":
        shown = _fmt(value, pct=True)
    else:
        shown = _fmt(value, 3 if value < 10 else 0)
    need = t.get("min", t.get("max"))
    if ("min" in t and value >= need) or ("max" in t and value <= need):
        return [t["name"], shown, "met"]
    return [t["name"], shown, f"missed ({value / need:.2f} of the target)" if "min" in t
            else f"missed ({value / need:.2f}× the limit)"]


def targets_table(records, kind: str | None) -> list[str]:
    rows = [_target_row(records, t) for t in TARGETS[kind]] if kind else []
    return _table("Targets", ["target", "measured", "status"], rows)


def problems(records) -> list[str]:
    rows = []
    for r in records:
        if "skipped" in r or r.get("ok") is False:
            what = f"{r.get('bench')}/{r.get('impl')} [{r.get('label')}] {r.get('preset', '')} B{r.get('batch', '')}"
            rows.append(f"- {what}: {r.get('skipped') or r.get('error', '')[:300]}")
    return (["### Not measured", "", *rows, ""]) if rows else []


def environment_lines(records) -> list[str]:
    envs = [r for r in records if r.get("bench") == "env"]
    if not envs:
        return []
    e = envs[0]
    versions = ", ".join(f"{k} {v}" for k, v in e.get("versions", {}).items())
    loads = [r["load_avg_1m"] for r in envs if r.get("load_avg_1m") is not None]
    load = f"; 1-min load average at worker starts {min(loads):.2f}–{max(loads):.2f}" if loads else ""
    return [f"- hardware: {e.get('gpu') or 'no GPU'}; CPU {e.get('cpu')} × {e.get('cpu_cores')} cores{load}",
            f"- software: Python {e.get('python')}, {versions}", f"- git: {e.get('git')}", ""]


def summary(records, targets: str | None = None) -> str:
    """The short table printed last by the run scripts: targets, main training and decoding rows, problems."""
    bad = sum(1 for r in records if "skipped" in r or r.get("ok") is False)
    tail = [f"{bad} case(s) skipped or failed: see report.md"] if bad else []
    return "\n".join(targets_table(records, targets) + train_table(records) + decode_table(records) + tail)


def markdown(records, title: str = "Benchmark report", targets: str | None = None) -> str:
    suite = next((r for r in records if r.get("bench") == "suite"), {})
    head = [f"## {title}", ""]
    if suite:
        head += [f"- command: `{suite.get('command')}` ({suite.get('wall_s', 0):.0f} s)"]
    lines = head + environment_lines(records) + targets_table(records, targets) + ceilings_table(records) + \
        train_table(records) + decode_table(records) + levers_table(records) + memory_table(records) + data_table(records) + problems(records)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plots


def plot(records, out_dir: Path) -> list[Path]:
    """train.png, decode.png and levers.png (those with data). Returns the paths written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    train = _by_shape(records, "train")
    if train:
        fig, axes = plt.subplots(1, len(train), figsize=(4.5 * len(train), 3.8), squeeze=False)
        for ax, (key, impls) in zip(axes[0], train.items()):
            names = [i for i in TRAIN_IMPLS if i in impls]
            ax.bar(names, [impls[n]["tokens_per_s"] for n in names], color=["C0" if n == "ours" else "C7" for n in names])
            ax.set_title(_shape(next(iter(impls.values()))), fontsize=9)
            ax.set_ylabel("tokens/s")
            ax.tick_params(axis="x", labelsize=8, rotation=20)
        written.append(_save(fig, out_dir / "train.png"))
    decode = _by_shape(records, "decode")
    if decode:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
        series: dict[tuple, list] = {}
        for key, impls in decode.items():
            for impl, r in impls.items():
                series.setdefault((r["preset"], impl), []).append((r["batch"], r["tokens_per_s"], r["ms_per_token"]))
        for (preset, impl), pts in sorted(series.items()):
            pts.sort()
            style = "-o" if impl == "ours" else "--s"
            ax1.plot([p[0] for p in pts], [p[2] for p in pts], style, label=f"{preset} {impl}")
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{preset} {impl}")
        for ax, label in ((ax1, "ms per decode step"), (ax2, "generated tokens/s")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        ax2.legend(fontsize=7)
        written.append(_save(fig, out_dir / "decode.png"))
    lever_rows = [(f"{r['bench']} {r['preset']} B{r['batch']}: {r['label']}", 100 * change)
                  for r, _, _, change in lever_changes(records) if change is not None]
    if lever_rows:
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(lever_rows) + 1.2))
        ax.barh([n for n, _ in lever_rows], [c for _, c in lever_rows],
                color=["C2" if c >= 0 else "C3" for _, c in lever_rows])
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel("speed change vs baseline (%)")
        ax.tick_params(axis="y", labelsize=7)
        written.append(_save(fig, out_dir / "levers.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write(records, out_dir: Path, title: str = "Benchmark report", targets: str | None = None) -> str:
    """report.md and the plots in `out_dir`; returns the markdown."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(records, title, targets)
    (out_dir / "report.md").write_text(text + "\n")
    plot(records, out_dir)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("files", nargs="+", help="results.jsonl files (JSON lines written by the harnesses)")
    p.add_argument("--out", help="directory for report.md and the PNGs (default: beside the first file)")
    p.add_argument("--targets", choices=sorted(TARGETS), help="which set's targets table to add (default: none)")
    p.add_argument("--title", default="Benchmark report", help="the report's heading")
    args = p.parse_args()
    records = common.read_records(args.files)
    print(write(records, Path(args.out or Path(args.files[0]).parent), args.title, args.targets))


if __name__ == "__main__":
    main()
