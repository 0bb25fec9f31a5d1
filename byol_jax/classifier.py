"""The linear classifier of the evaluation protocol, on frozen representations.

One SGD step (``classifier_step``) serves both levels: precomputed features in a notebook
(``train_linear_classifier`` then ``evaluate_linear``), and images through the frozen encoder
in ``python -m byol_jax.linear_eval`` (programs/linear_evaluation.py), where the step runs
under pmap / shard_map with gradients and metrics summed over the device axis.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from byol_jax import knn, optim, parallel
from byol_jax.data import ordering

PyTree = Any
TOP_K = (1, 5)


@struct.dataclass
class ClassifierState:
    """The linear layer on the frozen representation: params {'kernel': [D, C], 'bias': [C]}."""

    step: jax.Array
    params: PyTree
    opt_state: optax.OptState
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


def linear_optimizer(
    *,
    batch_size: int,
    total_steps: int,
    base_learning_rate: float = 0.2,
    reference_batch_size: int = 256,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum, lr ``base x batch / reference`` decayed by a cosine to 0."""
    schedule = optim.learning_rate_schedule(
        base_learning_rate,
        batch_size=batch_size,
        total_steps=total_steps,
        schedule="cosine",
        reference_batch_size=reference_batch_size or None,
    )
    return optim.create_optimizer(
        "sgd", schedule, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov
    )


def init_classifier(
    feature_dim: int, num_classes: int, tx: optax.GradientTransformation
) -> ClassifierState:
    """A zero-initialised linear layer (deterministic: nothing to draw, nothing to resume)."""
    params = {
        "kernel": jnp.zeros((feature_dim, num_classes), jnp.float32),
        "bias": jnp.zeros((num_classes,), jnp.float32),
    }
    return ClassifierState(jnp.zeros((), jnp.int32), params, tx.init(params), tx)


def classifier_logits(params: PyTree, features: jax.Array) -> jax.Array:
    """features [N, D] -> logits [N, C], in float32."""
    return nn.Dense(params["bias"].shape[0]).apply({"params": params}, features.astype(jnp.float32))


def classifier_step(
    state: ClassifierState, features: jax.Array, labels: jax.Array, axis_name: str | None = None
) -> tuple[ClassifierState, dict]:
    """One SGD step of the classifier on this replica's features [N, D] and labels int [N]
    (rows with label -1 are ignored). Under a mapped ``axis_name``, gradients are averaged over
    it and the metrics (loss, top1 of the batch, learning_rate) are exact global figures."""
    axis = parallel.bound_axis(axis_name)
    # The representation is frozen: no gradient reaches the encoder.
    features = jax.lax.stop_gradient(features)
    labelled = labels >= 0

    def loss_sum(params):
        logits = classifier_logits(params, features)
        xent = optax.softmax_cross_entropy_with_integer_labels(
            logits, jnp.where(labelled, labels, 0)
        )
        return jnp.sum(jnp.where(labelled, xent, 0.0)), logits

    (total, logits), grads = jax.value_and_grad(loss_sum, has_aux=True)(state.params)
    sums = {
        "loss": total,
        "correct": jnp.sum(labelled & (jnp.argmax(logits, -1) == labels)).astype(jnp.float32),
        "count": jnp.sum(labelled).astype(jnp.float32),
    }
    if axis is not None:
        grads, sums = jax.lax.psum((grads, sums), axis)
    count = jnp.maximum(sums["count"], 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)  # the gradient of the global mean loss
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )
    metrics = {"loss": sums["loss"] / count, "top1": sums["correct"] / count}
    learning_rate = getattr(opt_state, "hyperparams", {}).get("learning_rate")
    if learning_rate is not None:
        metrics["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
    return new_state, metrics


def correct_counts(
    params: PyTree, features: jax.Array, labels: jax.Array, axis_name: str | None = None
) -> dict:
    """{'top1': hits, 'top5': hits, 'count': labelled rows}, summed over ``axis_name`` when
    mapped; rows with label -1 (padding) are not counted."""
    logits = classifier_logits(params, features)
    labelled = labels >= 0
    counts = {"count": jnp.sum(labelled).astype(jnp.float32)}
    for k in TOP_K:
        if k <= logits.shape[-1]:
            _, top = jax.lax.top_k(logits, k)
            hit = jnp.any(top == labels[:, None], axis=-1) & labelled
            counts[f"top{k}"] = jnp.sum(hit).astype(jnp.float32)
    axis = parallel.bound_axis(axis_name)
    return counts if axis is None else jax.lax.psum(counts, axis)


# --------------------------------------------------------------------- features level


def train_linear_classifier(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    num_classes: int,
    *,
    batch_size: int = 256,
    num_epochs: int = 80,
    total_steps: int = -1,
    base_learning_rate: float = 0.2,
    reference_batch_size: int = 256,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> ClassifierState:
    """The linear protocol on precomputed features [N, D] with int labels [N].

    Batches of ``batch_size`` rows; epoch e visits the rows in the order
    ``default_rng([seed, e]).permutation(N)``. ``total_steps > 0`` overrides ``num_epochs``.
    Returns the trained ClassifierState (``evaluate_linear`` scores it).
    """
    features = np.asarray(train_features, np.float32)
    labels = np.asarray(train_labels, np.int32)
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(
            f"train_features must be [N, D] and train_labels [N], got {features.shape} and "
            f"{labels.shape}."
        )
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"train_labels must be in [0, num_classes={num_classes}).")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    steps_per_epoch = max(1, len(labels) // batch_size)
    steps = total_steps if total_steps > 0 else num_epochs * steps_per_epoch
    if steps <= 0:
        raise ValueError("set num_epochs or total_steps to a positive number.")
    tx = linear_optimizer(
        batch_size=batch_size,
        total_steps=steps,
        base_learning_rate=base_learning_rate,
        reference_batch_size=reference_batch_size,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
    )
    state = init_classifier(features.shape[1], num_classes, tx)
    step_fn = jax.jit(classifier_step, donate_argnums=0)
    for step in range(steps):
        # The data package's ordering contract: epoch e visits default_rng([seed, e]).permutation.
        positions = ordering.stream_positions(step, batch_size, 0, 1)
        rows = ordering.example_indices(seed, positions, len(labels))
        state, _ = step_fn(state, features[rows], labels[rows])
    return state


def evaluate_linear(
    state: ClassifierState | PyTree, features: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
    """{'top1', 'top5'} of the classifier (a ClassifierState or its params) on features [N, D]
    and labels [N]."""
    params = state.params if isinstance(state, ClassifierState) else state
    logits = jax.jit(classifier_logits)(params, jnp.asarray(features, jnp.float32))
    return knn.top_k_accuracy(np.asarray(logits), np.asarray(labels), TOP_K)
