"""The XLA flags every test process runs with, added to any XLA_FLAGS a test sets itself (`with_test_flags`).

None at present: with LLVM's optimisation off (`--xla_backend_optimization_level=0`, a third less compile time) a
pytest worker crashed twice inside XLA:CPU's compiler in fresh-clone runs, so the suite compiles as users do.
"""

TEST_XLA_FLAGS = ""


def with_test_flags(env: dict) -> dict:
    """`env` with TEST_XLA_FLAGS in its XLA_FLAGS."""
    flags = env.get("XLA_FLAGS", "")
    if not TEST_XLA_FLAGS or TEST_XLA_FLAGS in flags:
        return env
    return {**env, "XLA_FLAGS": f"{TEST_XLA_FLAGS} {flags}".strip()}
