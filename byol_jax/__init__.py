"""byol_jax: BYOL (Bootstrap Your Own Latent) in JAX/Flax.

Importing the package loads the core only: the learner, its loss and EMA target, the
networks, the optimisers and the device mapping (no TensorFlow, orbax or matplotlib). The
rest loads on first use, e.g. ``byol_jax.pretrained.load(workdir)`` or ``byol_jax.data``.

Layers (each imports only from the ones below it):

* entry points: ``train``, ``linear_eval``, ``embed``, ``pictures`` (``python -m byol_jax.X``)
* programs: ``programs.pretraining``, ``programs.linear_evaluation``
* services: ``data`` (the only TensorFlow user), ``checkpoint`` (orbax), ``builders``,
  ``lifecycle``, ``loop``, ``monitor``, ``features``, ``plots``, ``pretrained``
* core: ``byol`` (learner, state, step), ``encoders``, ``losses``, ``ema``, ``augment``,
  ``image_ops``, ``optim``, ``parallel``, ``knn``, ``classifier``
* models: ``networks``
"""

import importlib

from byol_jax import networks, optim, parallel
from byol_jax.byol import BYOL, ByolState, normalize_images
from byol_jax.ema import cosine_tau_schedule, target_update
from byol_jax.losses import regression_loss

__all__ = [
    "BYOL",
    "ByolState",
    "cosine_tau_schedule",
    "networks",
    "normalize_images",
    "optim",
    "parallel",
    "regression_loss",
    "target_update",
]
__version__ = "0.2.0"

# Modules loaded on first attribute access: `byol_jax.pretrained.load(...)` works after a
# plain `import byol_jax`, and a notebook that never touches them never pays for their imports.
_LAZY = {
    "augment",
    "builders",
    "checkpoint",
    "classifier",
    "data",
    "default_config",
    "encoders",
    "features",
    "image_ops",
    "knn",
    "lifecycle",
    "loop",
    "monitor",
    "plots",
    "pretrained",
    "programs",
}


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"byol_jax.{name}")
    raise AttributeError(f"module 'byol_jax' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
