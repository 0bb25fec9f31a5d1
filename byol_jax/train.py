"""Pre-train BYOL: ``python -m byol_jax.train --config configs/cifar10.py --workdir DIR``.

Any config field can be overridden: ``--config.batch_size=512 --config.total_steps=1000``.
The run resumes from DIR's latest checkpoint when there is one.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from byol_jax import host_memory, monitor

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file in configs/.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    monitor.setup_logging()
    host_memory.configure_for_run()  # before JAX starts: on the CPU, steps reuse freed memory
    from byol_jax.programs import pretraining  # noqa: PLC0415 (after flags: JAX reads its flags)

    summary = pretraining.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    print(pretraining.format_summary(summary), flush=True)


if __name__ == "__main__":
    sys.exit(app.run(main))
