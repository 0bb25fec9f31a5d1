"""Flax NNX encoders through byol_jax.BYOL, with the guarantees the Linen path has: hidden
layers by path and by index, no gradient into the target, the EMA rule, pmap == one device
== shard_map with cross-replica BatchNorm, the same loss and step as the same network written
in Linen, embed, checkpoints that resume bit-identically, pretrained.load, and clear errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import byol_jax
from byol_jax import checkpoint, classifier, parallel, pretrained

IDENTITY = lambda key, x: x
FLIP = lambda key, x: x[:, :, ::-1, :]
TOL = dict(rtol=1e-5, atol=1e-5)


class Pool(nnx.Module):
    def __call__(self, x):
        return x.mean(axis=(1, 2))


class NnxNet(nnx.Module):
    """A user's NNX classifier: conv, BatchNorm, a pooling layer, two blocks, a head."""

    def __init__(self, rngs: nnx.Rngs, width: int = 6):
        self.features = nnx.Conv(3, width, (3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(width, momentum=0.9, use_fast_variance=False, rngs=rngs)
        self.pool = Pool()
        self.blocks = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(2)])
        self.head = nnx.Linear(width, 5, rngs=rngs)

    def __call__(self, x):
        x = self.pool(nnx.relu(self.norm(self.features(x))))
        for block in self.blocks:
            x = nnx.relu(block(x))
        return self.head(x)


class LinenNet(nn.Module):
    """The same network in Linen (names as the NNX attributes)."""

    width: int = 6
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(self.width, (3, 3), name="features")(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            use_fast_variance=False,
            axis_name=self.axis_name,
            name="norm",
        )(x)
        x = jnp.mean(nn.relu(x), axis=(1, 2))
        for i in range(2):
            x = nn.relu(nn.Dense(self.width, name=f"blocks_{i}")(x))
        return nn.Dense(5, name="head")(x)


def _learner(encoder=None, **kwargs):
    kwargs.setdefault("augment_fn", IDENTITY)
    kwargs.setdefault("augment_fn2", FLIP)
    return byol_jax.BYOL(
        encoder if encoder is not None else NnxNet(nnx.Rngs(0)),
        image_size=8,
        projection_size=8,
        projection_hidden_size=16,
        moving_average_decay=0.9,
        **kwargs,
    )


def _images(n=16, seed=1):
    return jax.random.uniform(jax.random.key(seed), (n, 8, 8, 3))


def _close(a, b, tol=TOL):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **tol), a, b)


def _expected_hidden(module, images, layer):
    """The hidden layer's output computed by hand from the NNX module, inference mode."""
    module.eval()
    features = module.features(images)
    norm = module.norm(features)
    pooled = module.pool(nnx.relu(norm))
    first = nnx.relu(module.blocks[0](pooled))
    second = nnx.relu(module.blocks[1](first))
    return {
        "features": features.reshape(len(images), -1),
        0: features.reshape(len(images), -1),
        "norm": norm.reshape(len(images), -1),
        "pool": pooled,
        2: pooled,
        "blocks.0": module.blocks[0](pooled),
        "blocks.1": module.blocks[1](first),
        None: module.head(second),
        -1: module.head(second),
    }[layer]


@pytest.mark.parametrize("layer", ["pool", 2, "features", 0, "norm", "blocks.0", "blocks.1", None, -1])  # fmt: skip
def test_hidden_layer_by_path_and_by_index(layer):
    module = NnxNet(nnx.Rngs(0))
    learner = _learner(module, hidden_layer=layer)
    images = _images()
    state = learner.init(jax.random.key(0), images, optax.sgd(0.1))
    representation = learner.embed(state, images, preprocess=False)
    _close(representation, _expected_hidden(module, images, layer), dict(rtol=1e-5, atol=1e-6))


def test_a_missing_layer_lists_what_exists():
    with pytest.raises(
        ValueError, match=r"'nope' is not a submodule of NnxNet.*'blocks.1'.*'pool'"
    ):
        _learner(hidden_layer="nope").check_hidden_layer(_images())
    with pytest.raises(ValueError, match=r"out of range: NnxNet calls 5 direct submodules"):
        _learner(hidden_layer=9).check_hidden_layer(_images())


def test_no_gradient_reaches_the_target_and_the_ema_rule():
    learner, images = _learner(), _images()
    state = learner.init(jax.random.key(0), images, optax.sgd(0.5))
    state, _ = jax.jit(learner.train_step)(state, images, jax.random.key(0))  # target != online
    grads = jax.grad(
        lambda target: learner.loss(state.replace(target_params=target), images, jax.random.key(1))
    )(state.target_params)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) == 0.0
    new, metrics = jax.jit(learner.train_step)(state, images, jax.random.key(1))
    expected = jax.tree.map(
        lambda old, online: 0.9 * old + 0.1 * online,
        state.target_params,
        {k: new.online_params[k] for k in ("encoder", "projector")},
    )
    _close(new.target_params, expected, dict(rtol=1e-6, atol=1e-7))
    assert float(metrics["tau"]) == pytest.approx(0.9)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new.online_params, state.online_params)  # fmt: skip
    assert max(jax.tree.leaves(moved["encoder"])) > 1e-4  # the NNX parameters do train


def _as_linen(params, stats):
    """The NNX encoder's parameters and statistics under LinenNet's names."""
    blocks = params["blocks"]
    return (
        {**{k: params[k] for k in ("features", "norm", "head")}, "blocks_0": blocks[0], "blocks_1": blocks[1]},
        {"norm": stats["norm"]},
    )  # fmt: skip


def _linen_state(nnx_state, linen_state, tx):
    """LinenNet's state holding exactly the NNX state's numbers."""
    out = {}
    for network in ("online", "target"):
        params = getattr(nnx_state, f"{network}_params")
        stats = getattr(nnx_state, f"{network}_batch_stats")
        encoder, encoder_stats = _as_linen(params["encoder"], stats["encoder"])
        out[f"{network}_params"] = {**params, "encoder": encoder}
        out[f"{network}_batch_stats"] = {**stats, "encoder": encoder_stats}
    return linen_state.replace(**out, opt_state=tx.init(out["online_params"]))


def test_nnx_and_linen_with_the_same_weights_give_the_same_loss_and_step():
    images, tx = _images(), optax.sgd(0.5)
    nnx_learner, linen_learner = _learner(), _learner(LinenNet())
    ours = nnx_learner.init(jax.random.key(0), images, tx)
    twin = _linen_state(ours, linen_learner.init(jax.random.key(0), images, tx), tx)
    after_nnx, m_nnx = jax.jit(nnx_learner.train_step)(ours, images, jax.random.key(0))
    after_linen, m_linen = jax.jit(linen_learner.train_step)(twin, images, jax.random.key(0))
    np.testing.assert_allclose(m_nnx["loss"], m_linen["loss"], **TOL)
    expected = _linen_state(after_nnx, after_linen, tx)
    for field in ("online_params", "target_params", "online_batch_stats", "target_batch_stats"):
        _close(getattr(after_linen, field), getattr(expected, field))


def _run(step, state, images, steps=2):
    for i in range(steps):
        state, metrics = step(state, images, jax.random.key(i))
    return state, metrics


def test_pmap_equals_one_device_equals_shard_map_with_cross_replica_batchnorm():
    learner, images = _learner(), _images()
    # A gentle rate: at 0.5 a ReLU crossing zero in step 2 turned 3e-6 of round-off into 6e-5.
    state = learner.init(jax.random.key(0), images, optax.sgd(0.1))
    single, _ = _run(jax.jit(learner.train_step), state, images)
    results = {}
    for mode in ("pmap", "shard_map"):
        replicas = parallel.Replicas(mode, learner.axis_name)
        mapped, _ = _run(
            replicas.map(learner.train_step, donate_state=False),
            replicas.replicate(state),
            replicas.shard(np.asarray(images)),
        )
        results[mode] = replicas.unreplicate(mapped)
    for mapped in results.values():
        _close(mapped.online_params, single.online_params)
        _close(mapped.online_batch_stats, single.online_batch_stats)
        _close(mapped.target_batch_stats, single.target_batch_stats)
    # Per-device BatchNorm (sync off) differs: the statistics really were averaged above.
    replicas = parallel.Replicas("shard_map", learner.axis_name)
    unsynced = _learner(sync_batchnorm=False)
    other, _ = _run(
        replicas.map(unsynced.train_step, donate_state=False),
        replicas.replicate(state),
        replicas.shard(np.asarray(images)),
    )
    diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), replicas.unreplicate(other).online_params, single.online_params)  # fmt: skip
    assert max(jax.tree.leaves(diff)) > 1e-4


def test_checkpoints_resume_bit_identically_and_pretrained_load(tmp_path):
    learner, images = _learner(), _images()
    tx = optax.adam(1e-2)
    state = learner.init(jax.random.key(0), images, tx)
    step = jax.jit(learner.train_step)
    straight, _ = _run(step, state, images, steps=4)
    half, _ = _run(step, state, images, steps=2)
    with checkpoint.Checkpointer(tmp_path / "checkpoints") as saver:
        saver.save(2, jax.device_get(half))
    restored_learner, restored = pretrained.load(str(tmp_path), learner=_learner(), tx=tx)
    for i in range(2, 4):
        restored, _ = step(restored, images, jax.random.key(i))
    jax.tree.map(np.testing.assert_array_equal, restored, straight)
    np.testing.assert_array_equal(
        restored_learner.embed(restored, images), learner.embed(straight, images)
    )


def test_linear_evaluation_of_an_nnx_encoder_from_python():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 64)
    images = np.where(labels[:, None, None, None] == 1, 0.8, 0.2) + 0.05 * rng.normal(size=(64, 8, 8, 3))  # fmt: skip
    learner = _learner(hidden_layer="pool")
    state = learner.init(jax.random.key(0), images, optax.sgd(0.1))
    features = np.asarray(learner.embed(state, images.astype(np.float32), preprocess=False))
    head = classifier.train_linear_classifier(features, labels, 2, batch_size=16, num_epochs=30)
    assert classifier.evaluate_linear(head, features, labels)["top1"] == 1.0  # separable


class CustomNorm(nnx.Module):
    """A hand-written BatchNorm: statistics in nnx.BatchStat, but no axis to sync over."""

    def __init__(self, width):
        self.mean = nnx.BatchStat(jnp.zeros(width))

    def __call__(self, x):
        return x - self.mean[...]


class CustomNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.norm = CustomNorm(4)

    def __call__(self, x):
        return self.norm(self.conv(x)).mean(axis=(1, 2))


def test_bad_encoders_are_clear_errors():
    with pytest.raises(TypeError, match="flax.linen Module or a flax.nnx Module, got function"):
        byol_jax.BYOL(lambda x: x, image_size=8)
    with pytest.raises(ValueError, match=r"holds random state \(nnx.Rngs, e.g. for Dropout\)"):

        class WithDropout(nnx.Module):
            def __init__(self, rngs):
                self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
                self.drop = nnx.Dropout(0.1, rngs=rngs)

        _learner(WithDropout(nnx.Rngs(0)))
    learner, images = _learner(CustomNet(nnx.Rngs(0))), _images()
    replicas = parallel.Replicas("shard_map")
    state = replicas.replicate(learner.init(jax.random.key(0), images, optax.sgd(0.1)))
    with pytest.raises(ValueError, match=r"CustomNet cannot average.*not an nnx.BatchNorm \(CustomNorm\)"):  # fmt: skip
        replicas.map(learner.train_step)(
            state, replicas.shard(np.asarray(images)), jax.random.key(0)
        )
