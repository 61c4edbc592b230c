"""Driver: runs groups of cases, each group in a fresh worker process (bench.py or any command printing JSON lines),
under a per-group time budget and one total deadline, streaming every record to one JSON-lines file.

Why processes: ours and the peer each get the whole device (JAX preallocates 75% of GPU memory; torch caches
what it freed), XLA_FLAGS can only be set before JAX starts, and a crash (an unknown XLA flag aborts the process)
costs one group, not the run. Ours and the peer still run in the same run, on the same machine, same shapes.

The matmul peak and copy bandwidth measured by the first group are passed to every later case (MFU and
bandwidth fractions use ceilings from the same run). A group that cannot start before its deadline, or cases a
killed worker never reached, get {"skipped": why} records, so the report says what was not measured.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks import common

BENCH = str(Path(__file__).resolve().parent / "bench.py")
DATA = str(Path(__file__).resolve().parent / "data_throughput.py")
SERVE = str(Path(__file__).resolve().parent / "serve_speed.py")


@dataclasses.dataclass
class Group:
    """Cases run in order by one worker process (or `command`, a program printing JSON lines)."""

    name: str
    section: str
    budget_s: float  # the worker skips cases that would start later than this after its start
    cases: list[dict] = dataclasses.field(default_factory=list)
    command: list[str] | None = None
    xla_flags: str = ""  # appended to XLA_FLAGS for this group's process
    optional: bool = False  # run only when its section is named in --sections


def case(bench: str, impl: str, **fields) -> dict:
    """A case dict for bench.py (see its docstring); `label` defaults to "baseline"."""
    return {"bench": bench, "impl": impl, "label": "baseline", **fields}


def flag_groups(variants: dict[str, str], cases, budget_s: float, optional: bool = False,
                baseline: bool = False) -> list[Group]:
    """Section "flags": one process per XLA_FLAGS variant {label: flags}; `cases(label)` lists what it runs.

    baseline: first run `cases("baseline")` without extra flags, so the section run alone has a same-run baseline
    (the report compares every variant with the first baseline of its run)."""
    slug = lambda label: re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-")
    groups = [Group("flags-baseline", "flags", budget_s, cases("baseline"), optional=optional)] if baseline else []
    return groups + [Group(slug(label), "flags", budget_s, cases(label), xla_flags=flags, optional=optional)
                     for label, flags in variants.items()]


def data_group(budget_s: float, *args: str) -> Group:
    """Section "data": benchmarks/data_throughput.py with `args` (it prints its own JSON lines)."""
    return Group("data", "data", budget_s, command=[sys.executable, DATA, *args])


def serve_group(budget_s: float, *args: str) -> Group:
    """Section "serve": benchmarks/serve_speed.py with `args` (ours and HF `transformers serve`, one at a time)."""
    return Group("serve", "serve", budget_s, command=[sys.executable, SERVE, *args])


class Runner:
    """Runs groups one after another, writing every record to `out_dir/results.jsonl` and a log."""

    def __init__(self, out_dir: Path, total_budget_s: float, grace_s: float, env: dict | None = None,
                 min_start_s: float = 20.0):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.results_path = self.out_dir / "results.jsonl"
        self.log_path = self.out_dir / "log.txt"
        self.start = time.time()
        self.deadline = self.start + total_budget_s
        self.grace_s, self.min_start_s = grace_s, min_start_s
        self.env = env or {}
        self.records: list[dict] = []
        self.ceilings: dict = {}
        self._results = open(self.results_path, "a")
        self._log = open(self.log_path, "a")

    def close(self) -> None:
        self._results.close()
        self._log.close()

    def record(self, record: dict) -> None:
        self.records.append(record)
        self._results.write(json.dumps(record) + "\n")
        self._results.flush()

    def say(self, text: str) -> None:
        line = f"[{time.time() - self.start:6.1f}s] {text}"
        print(line, flush=True)
        self._log.write(line + "\n")
        self._log.flush()

    def run(self, groups: list[Group]) -> list[dict]:
        for group in groups:
            self.run_group(group)
        return self.records

    def run_group(self, group: Group) -> None:
        now = time.time()
        deadline = min(self.deadline, now + group.budget_s)
        if deadline - now < self.min_start_s:
            self.say(f"skip group {group.name}: {max(self.deadline - now, 0):.0f}s left of the total budget")
            self._skipped(group, group.cases, "total time budget spent before its group started")
            return
        cases = [{**self.ceilings, **c, "section": group.section} for c in group.cases]
        cmd = group.command or [sys.executable, BENCH, "--cases", "-", "--deadline", str(deadline),
                                "--group", group.name]
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(common.ROOT), os.environ.get("PYTHONPATH")]))}
        if group.xla_flags:
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {group.xla_flags}".strip()
        self.say(f"group {group.name} ({group.section}): {len(cases) or 1} case(s), budget {deadline - now:.0f}s"
                 + (f", XLA_FLAGS+={group.xla_flags}" if group.xla_flags else ""))
        self._log.write(f"$ {shlex.join(cmd)}\n")
        self._log.flush()
        # Only bench.py workers read their cases from stdin; a command that exits without reading it must not make
        # the write fail (a broken pipe, seen when the command finished first).
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL if group.command else subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=self._log, text=True, env=env, cwd=common.ROOT,
                                start_new_session=True)
        got: list[dict] = []
        reader = threading.Thread(target=self._read, args=(proc, group, got), daemon=True)
        reader.start()
        if not group.command:
            try:
                proc.stdin.write(json.dumps(cases))
                proc.stdin.close()
            except BrokenPipeError:  # the worker died at start; its exit status and log say why
                pass
        hard = min(deadline + self.grace_s, self.deadline + self.grace_s)
        try:
            proc.wait(timeout=max(hard - time.time(), 1.0))
        except subprocess.TimeoutExpired:
            self.say(f"group {group.name}: still running at its hard deadline, killed")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=10)
        if proc.returncode:
            self.say(f"group {group.name}: worker exited with {proc.returncode} (see log.txt)")
        done = sum(1 for r in got if r.get("bench") not in ("env", None))
        why = "worker killed at its time limit" if proc.returncode == -signal.SIGKILL else \
            f"worker exited with {proc.returncode} before reaching it"
        self._skipped(group, cases[done:], why)

    def _read(self, proc, group: Group, got: list) -> None:
        for line in proc.stdout:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            self._tag(record, group)
            got.append(record)
            self.record(record)
            self._learn_ceiling(record)
            self.say(summarize(record))

    def _learn_ceiling(self, record: dict) -> None:
        self.ceilings = {**common.ceilings_from(record), **self.ceilings}

    def _skipped(self, group: Group, cases: list[dict], why: str) -> None:
        for c in cases:
            keys = {k: c[k] for k in ("bench", "impl", "label", "preset", "dtype", "model", "batch", "seq_len",
                                      "prompt_len", "new_tokens", "opts") if k in c}
            self.record(self._tag({**keys, "skipped": why}, group))

    @staticmethod
    def _tag(record: dict, group: Group) -> dict:
        record.setdefault("group", group.name)
        record.setdefault("section", group.section)
        if group.xla_flags:
            record["xla_flags_extra"] = group.xla_flags
        return record


def summarize(r: dict) -> str:
    """One human line per record for the console."""
    if r.get("bench") == "env":
        return f"  env: {r.get('gpu') or r.get('cpu')}, {r.get('cpu_cores')} cores, load {r.get('load_avg_1m')}"
    head = f"  {r.get('bench')}/{r.get('impl')} [{r.get('label')}]"
    if "skipped" in r:
        return f"{head}: skipped ({r['skipped']})"
    if r.get("ok") is False:
        return f"{head}: FAILED {r.get('error', '')[:200]}"
    if r.get("bench") == "peak":
        return f"{head}: {r['flops_per_s'] / 1e12:.1f} TFLOP/s ({r['dtype']}, n={r['n']})"
    if r.get("bench") == "bandwidth":
        return f"{head}: {r['bytes_per_s'] / 1e9:.0f} GB/s"
    if r.get("bench") == "train":
        mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else ""
        return (f"{head} {r['preset']} B{r['batch']}xT{r['seq_len']}: {r['tokens_per_s']:,.0f} tok/s, "
                f"step {r['step_ms']:.1f} ms{mfu}, compile {r.get('compile_s') or 0:.1f}s")
    if r.get("bench") == "decode":
        return (f"{head} {r['preset']} B{r['batch']}: {r['ms_per_token']:.3f} ms/token, "
                f"{r['tokens_per_s']:,.0f} tok/s, {r.get('achieved_gbps') or 0:.0f} GB/s")
    if r.get("bench") == "serve":
        ms = lambda k: f"{r[k]['p50']:.1f}/{r[k]['p99']:.1f}" if r.get(k) else "-"
        return (f"{head} {r['preset']} c={r['concurrency']}: {r['tokens_per_s']:,.0f} tok/s, TTFT p50/p99 "
                f"{ms('ttft_ms')} ms, ITL p50/p99 {ms('itl_ms')} ms, {r['failed']} failed")
    return f"  {json.dumps(r)[:200]}"


def finish(runner: Runner, argv: list[str], title: str, targets: str | None = None) -> str:
    """Writes the suite record, report.md and the plots; returns the short summary the run scripts print last."""
    from benchmarks import report

    runner.record({"bench": "suite", "title": title, "command": shlex.join(argv), "wall_s": time.time() - runner.start,
                   "out_dir": str(runner.out_dir)})
    report.write(runner.records, runner.out_dir, title, targets)
    runner.close()
    return report.summary(runner.records, targets)


def main(name: str, build, *, title: str, targets: str, total_budget_s: float, grace_s: float,
         env: dict | None = None, doc: str = "", default_out: Path | None = None) -> None:
    """The command line shared by run_cpu.py and run_gpu.py. `build(quick)` returns the list of groups."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=common.HelpFormatter)
    p.add_argument("--out", type=Path, help="directory for results.jsonl, log.txt, report.md and the plots (default: "
                   f"{default_out or f'benchmarks/results/{name}-<time>'})")
    p.add_argument("--budget", type=float, default=total_budget_s, help="total seconds (default: %(default)s)")
    p.add_argument("--sections", help="comma-separated sections to run (default: all but the optional ones)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats: checks the harness, not speed")
    p.add_argument("--list", action="store_true", help="print the groups and cases, run nothing")
    args = p.parse_args()
    groups = build(args.quick)
    wanted = set(args.sections.split(",")) if args.sections else None
    groups = [g for g in groups if (g.section in wanted if wanted else not g.optional)]
    if args.list:
        for g in groups:
            extra = (" XLA_FLAGS+=" + g.xla_flags if g.xla_flags else "") + (" [optional]" if g.optional else "")
            print(f"{g.section}/{g.name} (budget {g.budget_s:.0f}s){extra}")
            for c in g.cases:
                print("   ", json.dumps(c))
            if g.command:
                print("   ", shlex.join(g.command))
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or default_out or common.ROOT / "benchmarks" / "results" / f"{name}-{stamp}"
    runner = Runner(out, args.budget, grace_s, env)
    runner.say(f"{title}: {len(groups)} groups, total budget {args.budget:.0f}s, writing {out}")
    runner.run(groups)
    print(finish(runner, [Path(sys.argv[0]).name, *sys.argv[1:]], title, targets))
