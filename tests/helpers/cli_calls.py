"""Several `aigc-jax` commands in one fresh process (`run_calls`): for tests that need a process of their own (a
device count other than pytest's) but not one process per command. Each command's stdout and stderr are taken at
the file-descriptor level, so they hold all a separate process would print (C++ logs included) during the call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

from helpers.env import with_test_flags

ROOT = Path(__file__).resolve().parents[2]


def run_calls(*calls, env: dict | None = None, timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Runs each of `calls` (lists of `aigc-jax` arguments) in turn through the CLI's `main` in one new process;
    returns a completed process per call (its exit code, stdout and stderr)."""
    calls = [[str(a) for a in argv] for argv in calls]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        full_env = with_test_flags({**os.environ, "JAX_PLATFORMS": "cpu", **(env or {}),
                                    "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT),
                                                                   *filter(None, [os.environ.get("PYTHONPATH")])])})
        proc = subprocess.run([sys.executable, "-m", "helpers.cli_calls", json.dumps(calls), str(out)],
                              capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)
        if proc.returncode != 0 or not out.is_file():
            raise AssertionError(f"helpers.cli_calls failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        results = json.loads(out.read_text())
    return [subprocess.CompletedProcess(argv, r["returncode"], r["stdout"], r["stderr"])
            for argv, r in zip(calls, results)]


def _call(argv: list[str]) -> dict:
    from aigc_jax.cli import main

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush(), sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
        try:
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's usage errors, and a run stopped by a signal
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001 — shown as a process would show it: a traceback, exit 1
                traceback.print_exc()
                code = 1
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
        out.seek(0), err.seek(0)
        return {"returncode": code, "stdout": out.read().decode(errors="replace"),
                "stderr": err.read().decode(errors="replace")}


if __name__ == "__main__":
    results = [_call(argv) for argv in json.loads(sys.argv[1])]
    Path(sys.argv[2]).write_text(json.dumps(results))
