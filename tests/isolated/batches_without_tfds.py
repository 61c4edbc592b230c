"""test_data_sources: with tensorflow_datasets unimportable, aigc_jax and its data package import and batch."""

import sys


def main(argv=None):
    sys.modules["tensorflow_datasets"] = None
    import numpy as np

    import aigc_jax
    import aigc_jax.data

    assert aigc_jax
    b = aigc_jax.data.Batches(np.arange(100), 8, 4, seed=0).batch(0)
    print(b["tokens"].shape)


if __name__ == "__main__":
    main(sys.argv[1:])
