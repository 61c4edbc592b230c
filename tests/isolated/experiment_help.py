"""test_experiments: finetune_sft --help (run from the checkout's root) without importing jax; prints whether it
was imported."""

import sys


def main(argv=None):
    sys.path.insert(0, "experiments")
    import common
    import finetune_sft

    try:
        common.main_guard(finetune_sft.main, ["--help"])
    except SystemExit:
        pass
    print("jax" in sys.modules)


if __name__ == "__main__":
    main(sys.argv[1:])
