"""test_model: importing aigc_jax (its CLI, train, decode and interop) pulls in neither TensorFlow nor TFDS."""

import importlib
import json
import sys


def main(argv=None):
    import aigc_jax
    import aigc_jax.cli

    for m in ["aigc_jax.train", "aigc_jax.decode", "aigc_jax.interop"]:
        try:
            importlib.import_module(m)
        except ModuleNotFoundError as e:
            if e.name != m:
                raise
    aigc_jax.cli.build_parser()
    print(json.dumps({"tfds": "tensorflow_datasets" in sys.modules, "tf": "tensorflow" in sys.modules}))


if __name__ == "__main__":
    main(sys.argv[1:])
