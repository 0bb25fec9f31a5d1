"""Mixed precision: bf16 compute with float32 parameters, optimiser state, EMA and loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import byol_jax
from byol_jax import builders, networks

FLIP = lambda key, x: x[:, :, ::-1, :]


def _learner(dtype):
    return byol_jax.BYOL(
        networks.tiny_resnet(dtype=dtype, num_filters=8),
        image_size=8,
        projection_size=16,
        projection_hidden_size=32,
        augment_fn=lambda key, x: x,
        augment_fn2=FLIP,
        moving_average_decay=0.9,
        dtype=dtype,
    )


def test_bf16_step_stays_close_to_float32_and_keeps_float32_state():
    images = jax.random.uniform(jax.random.key(1), (32, 8, 8, 3))
    tx = optax.sgd(0.05, momentum=0.9)
    full, half = _learner(jnp.float32), _learner(jnp.bfloat16)
    state = full.init(jax.random.key(0), images, tx)
    states = {"f32": state, "bf16": state}
    metrics = {}
    for _ in range(1):
        states["f32"], metrics["f32"] = jax.jit(full.train_step)(
            states["f32"], images, jax.random.key(0)
        )
        states["bf16"], metrics["bf16"] = jax.jit(half.train_step)(
            states["bf16"], images, jax.random.key(0)
        )
    # Parameters, optimiser state and the EMA target stay float32.
    for leaf in jax.tree.leaves(
        (states["bf16"].online_params, states["bf16"].target_params, states["bf16"].opt_state)
    ):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
    assert metrics["bf16"]["loss"].dtype == jnp.float32
    np.testing.assert_allclose(metrics["bf16"]["loss"], metrics["f32"]["loss"], rtol=3e-2)
    # The parameters moved alike. At initialisation online and target agree, so the gradient
    # is a small difference of large activations and bf16 rounding (3 digits) shows in it:
    # measured ~15 % of the update on this tiny network; a wrong cast gives >= 100 %.
    moved = lambda s: jax.tree.map(lambda a, b: a - b, s.online_params, state.online_params)
    a, b = jax.tree.leaves(moved(states["f32"])), jax.tree.leaves(moved(states["bf16"]))
    diff = np.sqrt(sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(a, b, strict=True)))
    norm = np.sqrt(sum(float(jnp.sum(x**2)) for x in a))
    assert diff / norm < 0.35, diff / norm
    # ...and bf16 really computed in bf16 (it differs from float32).
    assert diff > 0


def test_auto_precision_is_bf16_on_accelerators_and_float32_on_the_cpu(monkeypatch):
    assert builders.compute_dtype("auto") == jnp.float32  # this suite runs on the CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert builders.compute_dtype("auto") == jnp.bfloat16
    assert builders.compute_dtype("float32") == jnp.float32
