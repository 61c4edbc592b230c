"""The XLA flags every test process runs with.

LLVM's optimisation is off: about a third less compile time on these tiny programs, whose run time is negligible.
Both sides of every comparison run under the same flags; a test that sets XLA_FLAGS itself (device counts) passes
its environment through `with_test_flags`, which adds them.
"""

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def with_test_flags(env: dict) -> dict:
    """`env` with TEST_XLA_FLAGS in its XLA_FLAGS."""
    flags = env.get("XLA_FLAGS", "")
    return env if TEST_XLA_FLAGS in flags else {**env, "XLA_FLAGS": f"{TEST_XLA_FLAGS} {flags}".strip()}
