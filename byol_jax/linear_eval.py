"""Linear evaluation of a pre-trained encoder:

    python -m byol_jax.linear_eval --config configs/linear_eval/cifar10.py \
        --config.pretrained_workdir=workdirs/cifar10 --workdir workdirs/cifar10_linear

Any config field can be overridden (``--config.num_epochs=10``); the data settings default
to the pre-training run's. The run resumes from ``--workdir``'s latest checkpoint and ends
by printing top-1/top-5 and writing them to ``<workdir>/results.json``.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from byol_jax import host_memory, monitor

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file in configs/linear_eval/.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    monitor.setup_logging()
    host_memory.configure_for_run()  # before JAX starts: on the CPU, steps reuse freed memory
    from byol_jax.programs import linear_evaluation  # noqa: PLC0415 (after flags: JAX reads its flags)

    results = linear_evaluation.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    print(linear_evaluation.format_results(results), flush=True)


if __name__ == "__main__":
    sys.exit(app.run(main))
