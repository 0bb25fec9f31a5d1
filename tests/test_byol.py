"""The BYOL core: loss, EMA target, SimSiam mode, hidden layers, device mapping, bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import byol_jax
from byol_jax import networks, parallel

IDENTITY = lambda key, x: x
FLIP = lambda key, x: x[:, :, ::-1, :]


def _learner(**kwargs):
    kwargs.setdefault("augment_fn", IDENTITY)
    kwargs.setdefault("augment_fn2", FLIP if kwargs["augment_fn"] is IDENTITY else None)
    return byol_jax.BYOL(
        kwargs.pop("encoder", networks.tiny_resnet()),
        image_size=kwargs.pop("image_size", 8),
        projection_size=8,
        projection_hidden_size=16,
        **kwargs,
    )


def _images(n=16, size=8, seed=1):
    return jax.random.uniform(jax.random.key(seed), (n, size, size, 3))


def test_regression_loss_matches_numpy():
    rng = np.random.default_rng(0)
    p, z = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
    cos = np.sum(p * z, -1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(z, axis=-1))
    np.testing.assert_allclose(byol_jax.regression_loss(p, z), 2 - 2 * cos, rtol=1e-5, atol=1e-6)
    # Identical directions cost 0, opposite directions cost 4, whatever the norms.
    np.testing.assert_allclose(byol_jax.regression_loss(p, 3 * p), 0, atol=1e-6)
    np.testing.assert_allclose(byol_jax.regression_loss(p, -p), 4, atol=1e-6)


def test_no_gradient_reaches_the_target():
    learner = _learner()
    images = _images()
    state = learner.init(jax.random.key(0), images, optax.sgd(0.1))
    grads = jax.grad(
        lambda target: learner.loss(state.replace(target_params=target), images, jax.random.key(0))
    )(state.target_params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
    online_grads = jax.grad(
        lambda online: learner.loss(state.replace(online_params=online), images, jax.random.key(0))
    )(state.online_params)
    assert float(optax.tree.norm(online_grads)) > 1e-3


def test_ema_update_after_the_optimiser_step():
    tau = 0.9
    learner = _learner(moving_average_decay=tau)
    images = _images()
    state = learner.init(jax.random.key(0), images, optax.sgd(0.5))
    state, _ = jax.jit(learner.train_step)(state, images, jax.random.key(0))  # target != online now
    new, metrics = jax.jit(learner.train_step)(state, images, jax.random.key(1))
    assert float(metrics["tau"]) == pytest.approx(tau)
    for key in ("encoder", "projector"):
        expected = jax.tree.map(
            lambda old, online: tau * old + (1 - tau) * online,
            state.target_params[key],
            new.online_params[key],
        )
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
            new.target_params[key],
            expected,
        )
    assert "predictor" not in new.target_params
    # The online network moved, and the target moved by (1 - tau) of the way to it.
    moved = lambda a, b: float(jnp.abs(a - b).max()) > 1e-4
    assert moved(
        new.online_params["projector"]["Dense_0"]["kernel"],
        state.online_params["projector"]["Dense_0"]["kernel"],
    )


def test_cosine_tau_schedule_ends():
    schedule = byol_jax.cosine_tau_schedule(0.996, total_steps=1000)
    assert float(schedule(0)) == pytest.approx(0.996)
    assert float(schedule(500)) == pytest.approx(1 - 0.004 / 2, abs=1e-7)
    assert float(schedule(1000)) == pytest.approx(1.0)
    learner = _learner(moving_average_decay=schedule)
    images = _images()
    state = learner.init(jax.random.key(0), images, optax.sgd(0.1))
    _, metrics = learner.train_step(state, images, jax.random.key(0))
    assert float(metrics["tau"]) == pytest.approx(0.996)


def test_simsiam_mode_has_no_target_and_the_seed_projector():
    learner = _learner(use_momentum=False)
    images = _images()
    state = learner.init(jax.random.key(0), images, optax.sgd(0.1))
    assert state.target_params is None and state.target_batch_stats is None
    projector = state.online_params["projector"]
    assert sorted(projector) == ["BatchNorm_0", "BatchNorm_1", "Dense_0", "Dense_1", "Dense_2"]
    assert all("bias" not in projector[f"Dense_{i}"] for i in range(3))
    assert projector["Dense_0"]["kernel"].shape == (8, 16)  # tiny resnet: 8-d representation
    assert projector["Dense_2"]["kernel"].shape == (16, 8)
    assert "BatchNorm_2" in state.online_batch_stats["projector"]  # no affine, statistics only
    new, metrics = jax.jit(learner.train_step)(state, images, jax.random.key(0))
    assert new.target_params is None and np.isfinite(metrics["loss"])
    assert "tau" in metrics


class Classifier(nn.Module):
    """A user-written classifier: features, a named pooling layer, then a head."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(6, (3, 3), name="features")(x)
        x = nn.BatchNorm(use_running_average=not train, name="norm")(x)
        x = networks.GlobalAvgPool(name="pool")(nn.relu(x))
        return nn.Dense(5, name="head")(x)


@pytest.mark.parametrize("hidden_layer", ["pool", -2, "features", 0, None, -1])
def test_hidden_layer_by_name_and_index(hidden_layer):
    learner = _learner(encoder=Classifier(), hidden_layer=hidden_layer)
    images = _images()
    state = learner.init(jax.random.key(0), images, optax.sgd(0.1))
    rep = learner.embed(state, images, preprocess=False)
    variables = {
        "params": state.online_params["encoder"],
        "batch_stats": state.online_batch_stats["encoder"],
    }
    logits, inter = Classifier().apply(variables, images, train=False, capture_intermediates=True)
    expected = {
        "pool": inter["intermediates"]["pool"]["__call__"][0],
        -2: inter["intermediates"]["pool"]["__call__"][0],
        "features": inter["intermediates"]["features"]["__call__"][0].reshape(16, -1),
        0: inter["intermediates"]["features"]["__call__"][0].reshape(16, -1),
        None: logits,
        -1: logits,
    }[hidden_layer]
    np.testing.assert_allclose(rep, expected, rtol=1e-5, atol=1e-6)


def test_hidden_layer_errors_list_what_exists():
    images = _images()
    with pytest.raises(ValueError, match=r"'nope' is not a submodule.*'features'.*'head'"):
        _learner(encoder=Classifier(), hidden_layer="nope").init(
            jax.random.key(0), images, optax.sgd(0.1)
        )
    with pytest.raises(ValueError, match=r"out of range.*4 direct submodules"):
        _learner(encoder=Classifier(), hidden_layer=7).init(
            jax.random.key(0), images, optax.sgd(0.1)
        )


def test_bad_input_is_a_clear_error():
    learner = _learner()
    images = _images()
    state = learner.init(jax.random.key(0), images, optax.sgd(0.1))
    with pytest.raises(ValueError, match="more than one image"):
        learner.train_step(state, images[:1], jax.random.key(0))
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        learner.train_step(state, images[0], jax.random.key(0))
    with pytest.raises(ValueError, match="4 channels but the learner takes 3"):
        learner.train_step(state, jnp.ones((4, 8, 8, 4)), jax.random.key(0))
    with pytest.raises(ValueError, match="channels-last"):
        learner.embed(state, jnp.ones((4, 3, 8, 8)))
    with pytest.raises(ValueError, match="expected \\(16, 8, 8, 3\\)"):
        learner.train_step(state, _images(size=12), jax.random.key(0))
    with pytest.raises(ValueError, match="tau.*\\[0, 1\\]"):
        _learner(moving_average_decay=1.5)
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        _learner(image_size=0)
    with pytest.raises(TypeError, match="flax.linen Module"):
        byol_jax.BYOL(lambda x: x, image_size=8)
    with pytest.raises(ValueError, match="not divisible by the 8 devices.*multiple of 8"):
        parallel.Replicas("pmap").check_batch_size(12)


@pytest.fixture(scope="module")
def mapped_setup():
    learner = _learner(moving_average_decay=0.9)
    images = _images(16)
    tx = byol_jax.optim.create_optimizer(
        "lars",
        byol_jax.optim.learning_rate_schedule(1.0, batch_size=16, total_steps=10, warmup_steps=1),
    )
    state = learner.init(jax.random.key(0), images, tx)
    return learner, state, images


def _run(step, state, images, steps=3):
    for i in range(steps):
        state, metrics = step(state, images, jax.random.key(i))
    return state, metrics


def _assert_trees_close(a, b, tol=1e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol), a, b)


def test_pmap_equals_single_device_with_cross_replica_batchnorm(mapped_setup):
    learner, state, images = mapped_setup
    single, single_metrics = _run(jax.jit(learner.train_step), state, images)
    replicas = parallel.Replicas("pmap", learner.axis_name)
    assert replicas.num_replicas == 8
    mapped, metrics = _run(
        replicas.map(learner.train_step, donate_state=False),
        replicas.replicate(state),
        replicas.shard(np.asarray(images)),
    )
    mapped = replicas.unreplicate(mapped)
    _assert_trees_close(single.online_params, mapped.online_params)
    _assert_trees_close(single.target_params, mapped.target_params)
    _assert_trees_close(single.online_batch_stats, mapped.online_batch_stats)
    _assert_trees_close(single.target_batch_stats, mapped.target_batch_stats)
    assert replicas.fetch(metrics)["loss"] == pytest.approx(float(single_metrics["loss"]), rel=1e-5)
    # Without cross-replica BatchNorm the statistics are per device: the result differs.
    unsynced = _learner(moving_average_decay=0.9, sync_batchnorm=False)
    other, _ = _run(
        replicas.map(unsynced.train_step, donate_state=False),
        replicas.replicate(state),
        replicas.shard(np.asarray(images)),
    )
    diff = jax.tree.map(
        lambda a, b: float(jnp.abs(a - b).max()),
        replicas.unreplicate(other).online_params,
        single.online_params,
    )
    assert max(jax.tree.leaves(diff)) > 1e-4


def test_shard_map_equals_pmap(mapped_setup):
    learner, state, images = mapped_setup
    by_pmap = parallel.Replicas("pmap", learner.axis_name)
    by_shard_map = parallel.Replicas("shard_map", learner.axis_name)
    a, _ = _run(
        by_pmap.map(learner.train_step, donate_state=False),
        by_pmap.replicate(state),
        by_pmap.shard(np.asarray(images)),
    )
    b, _ = _run(
        by_shard_map.map(learner.train_step),
        by_shard_map.replicate(state),
        by_shard_map.shard(np.asarray(images)),
    )
    _assert_trees_close(
        by_pmap.unreplicate(a).online_params, by_shard_map.unreplicate(b).online_params, 1e-6
    )
    _assert_trees_close(
        by_pmap.unreplicate(a).target_params, by_shard_map.unreplicate(b).target_params, 1e-6
    )


def test_host_cropped_views_are_accepted_on_every_path(mapped_setup):
    learner, state, images = mapped_setup
    views = np.stack([np.asarray(images), np.asarray(images)[:, :, ::-1, :]])
    same_learner = _learner(
        moving_average_decay=0.9, augment_fn2=IDENTITY
    )  # views given as they are
    from_views, _ = jax.jit(same_learner.train_step)(state, views, jax.random.key(0))
    from_images, _ = jax.jit(learner.train_step)(state, images, jax.random.key(0))
    _assert_trees_close(from_views.online_params, from_images.online_params, 1e-6)
    replicas = parallel.Replicas("shard_map", learner.axis_name)
    mapped, _ = replicas.map(same_learner.train_step)(
        replicas.replicate(state), replicas.shard(views), jax.random.key(0)
    )
    _assert_trees_close(replicas.unreplicate(mapped).online_params, from_images.online_params, 1e-5)


def test_the_step_compiles_once(mapped_setup):
    learner, state, images = mapped_setup
    traces = []

    def counted(state, images, key):
        traces.append(1)
        return learner.train_step(state, images, key)

    step = jax.jit(counted, donate_argnums=0)
    state = jax.tree.map(jnp.copy, state)
    for i in range(4):
        state, _ = step(state, images, jax.random.key(i))
    assert len(traces) == 1
    replicas = parallel.Replicas("pmap", learner.axis_name)
    mapped = replicas.map(counted)
    rstate, rimages = replicas.replicate(state), replicas.shard(np.asarray(images))
    for i in range(3):
        rstate, _ = mapped(rstate, rimages, jax.random.key(i))
    assert len(traces) == 2


def test_skip_nonfinite_steps_keeps_the_state():
    learner = _learner(skip_nonfinite_steps=True)
    images = _images()
    state = learner.init(jax.random.key(0), images, optax.sgd(0.1))
    bad = images.at[0, 0, 0, 0].set(jnp.nan)
    new, metrics = jax.jit(learner.train_step)(state, bad, jax.random.key(0))
    assert int(metrics["skipped"]) == 1 and int(new.step) == 1
    _assert_trees_close(new.online_params, state.online_params, 0)
    new, metrics = jax.jit(learner.train_step)(new, images, jax.random.key(0))
    assert int(metrics["skipped"]) == 0 and int(new.step) == 2


def test_metrics_report_the_learning_rate_of_the_step(mapped_setup):
    learner, state, images = mapped_setup
    step = jax.jit(learner.train_step)
    state, first = step(state, images, jax.random.key(0))
    _, second = step(state, images, jax.random.key(1))
    assert float(first["learning_rate"]) == 0.0  # linear warm-up starts at 0
    assert float(second["learning_rate"]) == pytest.approx(1.0 * 16 / 256)  # peak after 1 step


def test_online_probe_learns_without_touching_the_encoder_gradient():
    images = _images()
    labels = jnp.asarray([0, 1, 2, -1] * 4)  # every fourth row unlabelled
    probed = _learner(num_classes=3)
    state = probed.init(jax.random.key(0), images, optax.sgd(0.1))
    assert state.online_params["probe"]["kernel"].shape == (8, 3)
    plain = _learner()
    plain_state = state.replace(
        online_params={k: v for k, v in state.online_params.items() if k != "probe"}
    )
    grad = lambda learner, st, *extra: jax.grad(
        lambda p: learner.loss(st.replace(online_params=p), images, jax.random.key(0), *extra)
    )(st.online_params)
    with_probe, without = grad(probed, state, labels), grad(plain, plain_state)
    for key in ("encoder", "projector", "predictor"):
        _assert_trees_close(with_probe[key], without[key], 1e-6)
    assert float(jnp.abs(with_probe["probe"]["kernel"]).max()) > 0
    # The probe's metrics count labelled rows only, over the global batch.
    replicas = parallel.Replicas("pmap", probed.axis_name)
    step = replicas.map(probed.train_step)
    rstate = replicas.replicate(state)
    rimages, rlabels = replicas.shard(np.asarray(images)), replicas.shard(np.asarray(labels))
    history = []
    for i in range(30):
        rstate, metrics = step(rstate, rimages, jax.random.key(i), rlabels)
        history.append(replicas.fetch(metrics))
    assert history[-1]["probe_loss"] < 0.9 * history[0]["probe_loss"]  # the probe learns
    # top-1 is a fraction of the 12 labelled rows, summed over the 8 replicas.
    assert all(abs(12 * h["probe_top1"] - round(12 * h["probe_top1"])) < 1e-4 for h in history)
    assert "probe" not in replicas.unreplicate(rstate).target_params
    with pytest.raises(ValueError, match="needs labels"):
        probed.train_step(state, images, jax.random.key(0))


class PerDeviceEncoder(nn.Module):
    """A user's encoder with BatchNorm but no ``axis_name`` field: it cannot sync."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x))
        return jnp.mean(x, axis=(1, 2))


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_an_encoder_that_cannot_sync_its_batchnorm_is_refused_when_mapped(mode):
    images = _images()
    replicas = parallel.Replicas(mode)
    args = (replicas.shard(np.asarray(images)), jax.random.key(0))
    for sync in (None, True):
        learner = _learner(encoder=PerDeviceEncoder(), sync_batchnorm=sync)
        state = replicas.replicate(learner.init(jax.random.key(0), images, optax.sgd(0.1)))
        with pytest.raises(ValueError, match=r"PerDeviceEncoder cannot average its BatchNorm statistics over the 8 devices.*no `axis_name` field.*sync_batchnorm=False"):  # fmt: skip
            replicas.map(learner.train_step)(state, *args)
    # Asked for per-device statistics, or on one device, it trains.
    learner = _learner(encoder=PerDeviceEncoder(), sync_batchnorm=False)
    state = learner.init(jax.random.key(0), images, optax.sgd(0.1))
    _, metrics = replicas.map(learner.train_step)(replicas.replicate(state), *args)
    assert np.isfinite(replicas.fetch(metrics)["loss"])
    _, metrics = jax.jit(_learner(encoder=PerDeviceEncoder()).train_step)(state, images, args[1])
    assert np.isfinite(float(metrics["loss"]))
