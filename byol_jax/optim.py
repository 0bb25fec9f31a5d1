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
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, total_steps)
    if schedule == "constant":
        # optax.warmup_constant_schedule(0, peak, 0) stays at 0 (optax 0.2.8): no warm-up at
        # all is the constant itself.
        if warmup_steps == 0:
            return optax.constant_schedule(peak)
        return optax.warmup_constant_schedule(0.0, peak, warmup_steps)
    raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}.")


# What each optimiser reads besides the learning rate; anything else given is an error, not a
# setting silently ignored.
_READS = {
    "lars": ("weight_decay", "momentum", "trust_coefficient"),
    "adam": (),
    "adamw": ("weight_decay",),
    "sgd": ("weight_decay", "momentum", "nesterov"),
}


def create_optimizer(
    name: str,
    learning_rate: optax.Schedule,
    *,
    weight_decay: float = 0.0,
    momentum: float | None = None,
    trust_coefficient: float | None = None,
    nesterov: bool | None = None,
) -> optax.GradientTransformation:
    """'lars' (the paper), 'adam' (the seed's README: lr 3e-4), 'adamw' or 'sgd', with the
    learning rate injected as a hyperparameter so that the train step can report it.

    ``momentum`` (default 0.9 for LARS and SGD), ``trust_coefficient`` (LARS, default 1e-3),
    ``nesterov`` (SGD) and a non-zero ``weight_decay`` are refused by an optimiser that
    would ignore them (adam has no weight decay: use adamw)."""
    if name not in _READS:
        raise ValueError(f"Unknown optimizer {name!r}: use one of {sorted(_READS)}.")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
    given = {
        "weight_decay": weight_decay or None,
        "momentum": momentum,
        "trust_coefficient": trust_coefficient,
        "nesterov": nesterov or None,
    }
    ignored = [k for k, v in given.items() if v is not None and k not in _READS[name]]
    if ignored:
        hint = " (use 'adamw' for decoupled weight decay)" if "weight_decay" in ignored else ""
        raise ValueError(
            f"optimizer={name!r} does not use {', '.join(f'{k}={given[k]}' for k in ignored)}"
            f"{hint}: leave {' and '.join(ignored)} unset (or 0), or choose an optimiser that "
            f"reads it ({', '.join(n for n, reads in _READS.items() if ignored[0] in reads)})."
        )
    momentum = 0.9 if momentum is None else momentum
    factories = {
        "lars": lambda learning_rate: lars(
            learning_rate,
            weight_decay,
            momentum,
            1e-3 if trust_coefficient is None else trust_coefficient,
        ),
        "adam": lambda learning_rate: optax.adam(learning_rate),
        "adamw": lambda learning_rate: optax.adamw(
            learning_rate, weight_decay=weight_decay, mask=exclude_bias_and_norm
        ),
        "sgd": lambda learning_rate: optax.chain(
            optax.add_decayed_weights(weight_decay, mask=exclude_bias_and_norm),
            optax.sgd(learning_rate, momentum=momentum or None, nesterov=bool(nesterov)),
        ),
    }
    return optax.inject_hyperparams(factories[name])(learning_rate=learning_rate)
