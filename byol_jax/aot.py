"""Compile the pre-training step for a TPU pod ahead of time, on any machine, and report what
it needs per chip:

    python -m byol_jax.aot --config configs/imagenet.py --topology v5e:16x16

Needs libtpu (``pip install -e ".[tpu]"``); no TPU. The step is the trainer's own, for the
config's global batch over all of the topology's chips. Prints the process layout, memory
per device against its HBM (and the batch per device that would fit when it does not), FLOPs
per step and per image, the images/s the chip's peak bf16 rate would allow at
``--utilisation``, and the compile time; ``--json PATH`` writes them too. Config fields can
be overridden as for training (``--config.batch_size=2048``).
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file in configs/.", lock_config=True
)
_TOPOLOGY = flags.DEFINE_string("topology", None, "A TPU topology, e.g. v5e:16x16, v4:4x4x4.")
_NUM_CLASSES = flags.DEFINE_integer(
    "num_classes", None, "Classes of the online probe (default: the dataset's, without data)."
)
_UTILISATION = flags.DEFINE_float(
    "utilisation", 0.35, "Fraction of the peak bf16 rate for the images/s estimate."
)
_JSON = flags.DEFINE_string("json", None, "Also write the report to this JSON file.")
flags.mark_flags_as_required(["config", "topology"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from byol_jax.programs import ahead_of_time  # noqa: PLC0415 (after flags: JAX reads its own)

    config = _CONFIG.value
    try:
        num_classes = ahead_of_time.num_classes(config, _NUM_CLASSES.value)
        report, _ = ahead_of_time.compile_for_topology(config, _TOPOLOGY.value, num_classes)
    except (ahead_of_time.TopologyError, ValueError) as error:
        sys.exit(f"byol_jax.aot: {error}")
    print(ahead_of_time.describe(report, _UTILISATION.value), flush=True)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(ahead_of_time.as_dict(report, _UTILISATION.value), f, indent=2)


if __name__ == "__main__":
    sys.exit(app.run(main))
