"""What BYOL minimises: the regression loss between predictions and target projections, and
the online probe's cross-entropy on the labelled rows of the global batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def regression_loss(p: jax.Array, z: jax.Array) -> jax.Array:
    """BYOL's loss per example: ``2 - 2 cos(p, z)``, the squared distance of the L2-normalised
    vectors. p, z: [N, D] -> [N], computed in float32."""
    p = p.astype(jnp.float32)
    z = z.astype(jnp.float32)
    # The epsilon matches torch.nn.functional.normalize (the seed): max(||x||, 1e-12).
    p = p / jnp.maximum(jnp.linalg.norm(p, axis=-1, keepdims=True), 1e-12)
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    return 2.0 - 2.0 * jnp.sum(p * z, axis=-1)


def probe_loss(logits: jax.Array, labels: jax.Array, axis: str | None):
    """The probe's cross-entropy over the labelled rows (labels >= 0) of the *global* batch,
    and the sums the step reports: (loss, {'probe_loss_sum', 'probe_correct', 'probe_count'}).

    Replicas hold different numbers of labelled rows, so each divides its sum by the global
    count (times the replica count, which the gradient pmean divides out): the averaged
    gradient is that of the global mean, not a mean of per-replica means."""
    labelled = labels >= 0
    xent = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), jnp.where(labelled, labels, 0)
    )
    count = jnp.sum(labelled).astype(jnp.float32)
    loss_sum = jnp.sum(jnp.where(labelled, xent, 0.0))
    replicas, total = 1, count
    if axis is not None:
        replicas, total = jax.lax.axis_size(axis), jax.lax.psum(count, axis)
    correct = jnp.sum(labelled & (jnp.argmax(logits, -1) == labels)).astype(jnp.float32)
    sums = {"probe_loss_sum": loss_sum, "probe_correct": correct, "probe_count": count}
    return replicas * loss_sum / jnp.maximum(total, 1.0), sums
