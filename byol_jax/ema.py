"""The target network: an exponential moving average of the online encoder and projector,
with the paper's cosine schedule for its decay tau (docs/recipe.md#tau-schedule)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def target_update(online_params: PyTree, target_params: PyTree, tau: jax.Array) -> PyTree:
    """``tau * target + (1 - tau) * online`` for each part the target has (encoder and
    projector: the online predictor and probe have no target counterpart)."""
    online_part = {k: online_params[k] for k in target_params}
    return optax.incremental_update(online_part, target_params, 1.0 - tau)


def cosine_tau_schedule(base_tau: float, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """The paper's EMA decay: tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2, from tau_base
    at step 0 to 1 at step K."""
    check_tau(base_tau)
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive for the tau schedule, got {total_steps}.")

    def schedule(step):
        progress = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
        return 1.0 - (1.0 - base_tau) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0

    return schedule


def check_tau(tau: float) -> None:
    if not (isinstance(tau, int | float) and 0.0 <= tau <= 1.0):
        raise ValueError(f"moving_average_decay (tau) must be a number in [0, 1], got {tau!r}.")
