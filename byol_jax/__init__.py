"""byol_jax: BYOL (Bootstrap Your Own Latent) in JAX/Flax.

Importing the package loads the core only (no TensorFlow): the learner, networks,
optimisers and the device-mapping helpers.
"""

from byol_jax import networks, optim, parallel, pretrained
from byol_jax.byol import (
    BYOL,
    ByolState,
    cosine_tau_schedule,
    normalize_images,
    regression_loss,
)

__all__ = [
    "BYOL",
    "ByolState",
    "cosine_tau_schedule",
    "networks",
    "normalize_images",
    "optim",
    "parallel",
    "pretrained",
    "regression_loss",
]
__version__ = "0.1.0"
