"""test_data_sources: with tensorflow_datasets unimportable, a built token cache loads (argv: PATH, DATA_DIR); prints
its key, the train split's length and a batch's shape."""

import sys


def main(argv):
    sys.modules["tensorflow_datasets"] = None
    from aigc_jax import data, tokenizers

    ds = data.load(argv[0], tokenizers.byte_level(), data_dir=argv[1])
    print(ds.key, len(ds.train), data.Batches(ds.train, 8, 2).batch(0)["tokens"].shape)


if __name__ == "__main__":
    main(sys.argv[1:])
