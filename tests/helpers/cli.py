"""The CLI in this process (no interpreter start-up; programs compiled by earlier calls are reused)."""

import subprocess

from aigc_jax.cli import main as cli_main


def cli_in_process(capsys, *args) -> subprocess.CompletedProcess:
    """`aigc-jax ARGS…` through the CLI's own `main`, without paying a fresh interpreter's start-up; unlike
    conftest.cli_in_process, what was printed before the call (transformers' progress bars) is dropped first.

    Anything but a UserError would propagate here and fail the test; the subprocess tests (conftest.run_cli)
    cover the real entry point.
    """
    from aigc_jax import cli

    capsys.readouterr()  # drop what earlier steps printed (transformers' progress bars)
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def generate_error(capsys, *args):
    """`generate ARGS…` in this process must fail with one line on stderr; returns that line."""
    rc = cli_main(["generate", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1, err
    return err[0]
