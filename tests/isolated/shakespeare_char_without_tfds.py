"""test_experiments: experiments/shakespeare_char.py ARGS (run from the checkout's root) with tensorflow_datasets
unimportable, as on the GPU machine; exits with its status."""

import sys


def main(argv):
    sys.modules["tensorflow_datasets"] = None
    sys.path.insert(0, "experiments")
    import common
    import shakespeare_char

    return common.main_guard(shakespeare_char.main, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
