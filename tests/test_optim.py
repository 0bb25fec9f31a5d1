"""LARS as the BYOL authors wrote it, and the learning-rate schedule of the recipe."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from byol_jax import optim


def _reference_lars(params, grads_seq, lrs, weight_decay, momentum, eta):
    """NumPy LARS of the official BYOL code: decay, trust ratio, momentum, then lr.
    Bias-like (1-d) parameters get neither decay nor adaptation."""
    params = {k: np.array(v, np.float64) for k, v in params.items()}
    trace = {k: np.zeros_like(v) for k, v in params.items()}
    for grads, lr in zip(grads_seq, lrs, strict=True):
        for k, w in params.items():
            g = np.array(grads[k], np.float64)
            if w.ndim > 1:
                g = g + weight_decay * w
                w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
                if w_norm > 0 and g_norm > 0:
                    g = g * eta * w_norm / g_norm
            trace[k] = momentum * trace[k] + g
            params[k] = w - lr * trace[k]
    return params


def test_lars_matches_the_official_algorithm_while_the_lr_changes():
    rng = np.random.default_rng(0)
    params = {
        "kernel": rng.normal(size=(4, 3)).astype(np.float32),
        "bias": rng.normal(size=3).astype(np.float32),
    }
    grads_seq = [
        {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
        for _ in range(4)
    ]
    schedule = optim.learning_rate_schedule(0.4, batch_size=512, total_steps=4, warmup_steps=2)
    lrs = [float(schedule(i)) for i in range(4)]
    assert lrs == pytest.approx([0.0, 0.4, 0.8, 0.4])  # 0.4 * 512 / 256 = 0.8 at the peak
    tx = optim.lars(schedule, weight_decay=1e-2, momentum=0.9, trust_coefficient=1e-3)
    state = tx.init(params)
    ours = {k: jnp.asarray(v) for k, v in params.items()}
    for grads in grads_seq:
        updates, state = tx.update(grads, state, ours)
        ours = optax.apply_updates(ours, updates)
    expected = _reference_lars(params, grads_seq, lrs, 1e-2, 0.9, 1e-3)
    for k in params:
        np.testing.assert_allclose(ours[k], expected[k], rtol=1e-5, atol=1e-6)
    # optax.lars (lr applied before momentum) gives a different answer under warm-up.
    other = optax.lars(schedule, weight_decay=1e-2, trust_coefficient=1e-3, momentum=0.9)
    ostate, oparams = other.init(params), {k: jnp.asarray(v) for k, v in params.items()}
    for grads in grads_seq:
        updates, ostate = other.update(grads, ostate, oparams)
        oparams = optax.apply_updates(oparams, updates)
    assert np.abs(np.asarray(oparams["kernel"]) - expected["kernel"]).max() > 1e-4


def test_create_optimizer_exposes_the_learning_rate():
    schedule = optim.learning_rate_schedule(0.2, batch_size=4096, total_steps=100, warmup_steps=10)
    tx = optim.create_optimizer("lars", schedule, weight_decay=1.5e-6)
    params = {"w": jnp.ones((2, 2))}
    state = tx.init(params)
    for step in range(11):
        _, state = tx.update({"w": jnp.ones((2, 2))}, state, params)
        # The state after an update holds the learning rate that update used.
        assert float(state.hyperparams["learning_rate"]) == pytest.approx(float(schedule(step)))
    assert float(schedule(10)) == pytest.approx(0.2 * 16)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-7)
    assert float(schedule(55)) == pytest.approx(3.2 * 0.5, rel=1e-5)  # half-way down the cosine


def test_weight_decay_mask_leaves_out_biases_and_norms():
    params = {
        "Dense_0": {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.ones(2)},
        "BatchNorm_0": {"scale": jnp.ones(2)},
    }
    mask = optim.exclude_bias_and_norm(params)
    assert mask == {"Dense_0": {"kernel": True, "bias": False}, "BatchNorm_0": {"scale": False}}
    zero = jax.tree.map(jnp.zeros_like, params)
    for name in ("sgd", "adamw"):
        tx = optim.create_optimizer(name, 0.1, weight_decay=0.5)
        updates, _ = tx.update(zero, tx.init(params), params)
        # Zero gradients: the only update is the decay, -lr * wd * w on kernels alone.
        np.testing.assert_allclose(updates["Dense_0"]["kernel"], -0.1 * 0.5 * 2.0, rtol=1e-6)
        assert float(jnp.abs(updates["Dense_0"]["bias"]).max()) == 0.0
        assert float(jnp.abs(updates["BatchNorm_0"]["scale"]).max()) == 0.0


def test_settings_an_optimiser_ignores_are_refused():
    for name, setting in (
        ("adam", dict(momentum=0.9)),
        ("adam", dict(weight_decay=1e-6)),
        ("adamw", dict(nesterov=True)),
        ("lars", dict(nesterov=True)),
        ("sgd", dict(trust_coefficient=1e-3)),
    ):
        key = next(iter(setting))
        with pytest.raises(ValueError, match=rf"optimizer='{name}' does not use {key}="):
            optim.create_optimizer(name, 0.1, **setting)
    # What each reads is taken: momentum and Nesterov for SGD, the trust coefficient for LARS.
    optim.create_optimizer("sgd", 0.1, momentum=0.5, nesterov=True, weight_decay=1e-4)
    optim.create_optimizer("lars", 0.1, momentum=0.5, trust_coefficient=1e-2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(total_steps=0), "total_steps must be positive"),
        (dict(total_steps=10, warmup_steps=10), "warmup_steps must be in"),
        (dict(total_steps=10, schedule="step"), "'cosine' or 'constant'"),
    ],
)
def test_schedule_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        optim.learning_rate_schedule(0.1, batch_size=256, **kwargs)


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="Unknown optimizer 'rmsprop'"):
        optim.create_optimizer("rmsprop", 0.1)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_a_schedule_without_warm_up_starts_at_the_peak(schedule):
    rate = optim.learning_rate_schedule(0.1, batch_size=512, total_steps=8, schedule=schedule)
    assert float(rate(0)) == pytest.approx(0.2)  # 0.1 x 512 / 256
    assert float(rate(4)) == pytest.approx(0.2 if schedule == "constant" else 0.1)
