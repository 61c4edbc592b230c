"""test_data_sources: one of several processes loading PATH into DATA_DIR at once (argv); prints the key and sum."""

import sys

from aigc_jax import data, tokenizers


def main(argv):
    d = data.load(argv[0], tokenizers.byte_level(), data_dir=argv[1])
    print(d.key, int(d.train.sum()))


if __name__ == "__main__":
    main(sys.argv[1:])
