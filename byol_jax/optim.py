"""Optimisers and learning-rate schedules of the BYOL recipe, built from optax pieces."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

PyTree = Any


def exclude_bias_and_norm(params: PyTree) -> PyTree:
    """Mask (True = included) leaving out biases and BatchNorm scales/offsets: every
    parameter with fewer than two dimensions. The paper excludes exactly these from weight
    decay and from LARS adaptation."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def lars(
    learning_rate: float | optax.Schedule,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    trust_coefficient: float = 1e-3,
    mask: Callable[[PyTree], PyTree] | None = exclude_bias_and_norm,
) -> optax.GradientTransformation:
    """LARS as in the BYOL authors' code: weight decay, trust ratio
    ``trust_coefficient * ||w|| / ||g + wd w||``, momentum, and only then the learning rate.

    Hand-assembled because ``optax.lars`` scales by the learning rate *before* its momentum
    trace; the two differ whenever the learning rate changes (warm-up, cosine decay).
    Leaves outside ``mask`` get neither weight decay nor trust-ratio adaptation.
    """
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=mask),
        optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), mask)
        if mask is not None
        else optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient),
        optax.trace(decay=momentum, nesterov=False),
        optax.scale_by_learning_rate(learning_rate),
    )


def learning_rate_schedule(
    base_learning_rate: float,
    *,
    batch_size: int,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    reference_batch_size: int | None = 256,
) -> optax.Schedule:
    """Linear scaling rule (``base * batch / reference``), linear warm-up from 0, then cosine
    decay to 0 at ``total_steps`` (``schedule='cosine'``) or constant (``'constant'``)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}.")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}: "
            "shorten the warm-up or train for longer."
        )
    peak = base_learning_rate * (batch_size / reference_batch_size if reference_batch_size else 1)
    if schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, total_steps - warmup_steps)
    elif schedule == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}.")
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, peak, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def create_optimizer(
    name: str,
    learning_rate: optax.Schedule,
    *,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    trust_coefficient: float = 1e-3,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """'lars' (the paper), 'adam' (the seed's README: lr 3e-4), 'adamw' or 'sgd', with the
    learning rate injected as a hyperparameter so that the train step can report it."""
    factories = {
        "lars": lambda learning_rate: lars(
            learning_rate, weight_decay, momentum, trust_coefficient
        ),
        "adam": lambda learning_rate: optax.adam(learning_rate),
        "adamw": lambda learning_rate: optax.adamw(
            learning_rate, weight_decay=weight_decay, mask=exclude_bias_and_norm
        ),
        "sgd": lambda learning_rate: optax.chain(
            optax.add_decayed_weights(weight_decay, mask=exclude_bias_and_norm),
            optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov),
        ),
    }
    if name not in factories:
        raise ValueError(f"Unknown optimizer {name!r}: use one of {sorted(factories)}.")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
    return optax.inject_hyperparams(factories[name])(learning_rate=learning_rate)
