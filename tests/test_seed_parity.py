"""Parity with the seed, byol-pytorch 0.8.2, on golden values it produced.

tests/data/seed_golden.npz was written by tools/make_seed_golden.py (run in a separate
environment with torch); see that script for what each key holds. Weights are copied from
the seed's initial state into the Flax networks, one step runs on both sides, and the
results must agree to 1e-5 in float32.
"""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import byol_jax
from byol_jax import networks

GOLDEN = np.load(pathlib.Path(__file__).parent / "data" / "seed_golden.npz")
TOL = dict(rtol=1e-5, atol=1e-5)


class TinyNet(nn.Module):
    """The seed script's TinyNet: children conv, bn, relu, avgpool, fc, in that order."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(4, (3, 3), padding=1, name="conv")(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            use_fast_variance=False,
            name="bn",
        )(x)
        x = Relu(name="relu")(x)
        x = networks.GlobalAvgPool(name="avgpool")(x)
        return nn.Dense(10, name="fc")(x)


class Relu(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(x)


def _torch_to_flax(prefix: str, mode: str):
    """Seed tensors under `<mode>/<prefix>` -> (params, batch_stats) of our networks."""
    get = lambda name: jnp.asarray(GOLDEN[f"{mode}/{prefix}/{name}"])
    dense = lambda p: {"kernel": get(f"{p}.weight").T, **_maybe(get, f"{mode}/{prefix}/{p}.bias")}
    bn_params = lambda p: {"scale": get(f"{p}.weight"), "bias": get(f"{p}.bias")}
    bn_stats = lambda p: {"mean": get(f"{p}.running_mean"), "var": get(f"{p}.running_var")}

    def mlp(p, simsiam):
        layers = ((0, 1), (3, 4), (6, 7)) if simsiam else ((0, 1), (3, None))
        params, stats = {}, {}
        for i, (lin, bn) in enumerate(layers):
            params[f"Dense_{i}"] = dense(f"{p}.{lin}")
            if bn is not None:
                stats[f"BatchNorm_{i}"] = bn_stats(f"{p}.{bn}")
                if f"{mode}/{prefix}/{p}.{bn}.weight" in GOLDEN:  # last SimSiam BN: no affine
                    params[f"BatchNorm_{i}"] = bn_params(f"{p}.{bn}")
        return params, stats

    def encoder(p):
        conv = {
            "kernel": get(f"{p}.net.conv.weight").transpose(2, 3, 1, 0),
            "bias": get(f"{p}.net.conv.bias"),
        }
        params = {"conv": conv, "bn": bn_params(f"{p}.net.bn"), "fc": dense(f"{p}.net.fc")}
        return params, {"bn": bn_stats(f"{p}.net.bn")}

    simsiam = mode == "simsiam"
    enc, enc_stats = encoder("online_encoder")
    proj, proj_stats = mlp("online_encoder.projector", simsiam)
    pred, pred_stats = mlp("online_predictor", False)
    online = {"encoder": enc, "projector": proj, "predictor": pred}
    online_stats = {"encoder": enc_stats, "projector": proj_stats, "predictor": pred_stats}
    if simsiam:
        return online, online_stats, None, None
    tenc, tenc_stats = encoder("target_encoder")
    tproj, tproj_stats = mlp("target_encoder.projector", False)
    target = {"encoder": tenc, "projector": tproj}
    target_stats = {"encoder": tenc_stats, "projector": tproj_stats}
    return online, online_stats, target, target_stats


def _maybe(get, key):
    return {"bias": get(key.split("/", 2)[2])} if key in GOLDEN else {}


def _learner(mode, hidden_layer="avgpool"):
    identity = lambda key, x: x
    second = (lambda key, x: x[:, :, ::-1, :]) if mode == "byol_flip" else identity
    return byol_jax.BYOL(
        TinyNet(),
        image_size=8,
        hidden_layer=hidden_layer,
        projection_size=8,
        projection_hidden_size=16,
        augment_fn=identity,
        augment_fn2=second,
        moving_average_decay=0.9,
        use_momentum=mode != "simsiam",
        preprocess_fn=lambda x: x,
        views_in_one_batch=True,  # the seed's forward: both views in one call
    )


def _seed_state(mode, learner, tx):
    images = jnp.asarray(GOLDEN[f"{mode}/images"])
    state = learner.init(jax.random.key(0), images, tx)
    online, online_stats, target, target_stats = _torch_to_flax("init", mode)
    # The copied trees must have exactly the structure our init made.
    assert jax.tree.structure(online) == jax.tree.structure(state.online_params)
    assert jax.tree.structure(online_stats) == jax.tree.structure(state.online_batch_stats)
    state = state.replace(
        online_params=online,
        online_batch_stats=online_stats,
        target_params=target,
        target_batch_stats=target_stats,
        opt_state=tx.init(online),
    )
    return state, images


def test_loss_matches_seed():
    p, z = GOLDEN["loss/p"], GOLDEN["loss/z"]
    np.testing.assert_allclose(byol_jax.regression_loss(p, z), GOLDEN["loss/value"], **TOL)


def test_ema_matches_seed():
    old, new = jnp.asarray(GOLDEN["ema/old"]), jnp.asarray(GOLDEN["ema/new"])
    target = byol_jax.target_update({"encoder": new}, {"encoder": old}, jnp.float32(0.9))
    np.testing.assert_allclose(target["encoder"], GOLDEN["ema/value"], **TOL)


@pytest.mark.parametrize("mode", ["byol", "byol_flip", "simsiam"])
def test_one_step_matches_seed(mode):
    learner = _learner(mode)
    tx = optax.sgd(0.5)
    state, images = _seed_state(mode, learner, tx)
    loss = learner.loss(state, images, jax.random.key(0))
    np.testing.assert_allclose(loss, GOLDEN[f"{mode}/loss"], **TOL)

    new_state, metrics = jax.jit(learner.train_step)(state, images, jax.random.key(0))
    np.testing.assert_allclose(metrics["loss"], GOLDEN[f"{mode}/loss"], **TOL)
    online, online_stats, target, target_stats = _torch_to_flax("after", mode)
    _assert_same_step(state.online_params, new_state.online_params, online, lr=0.5)
    if mode == "simsiam":
        assert new_state.target_params is None
        return
    close = dict(rtol=1e-5, atol=1e-5 * _largest_update(state.online_params, online))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, **close), new_state.target_params, target
    )
    # Running means follow the seed; running variances differ by design (torch updates them
    # with the unbiased variance, Flax and the paper's code with the biased one).
    for ours, seed in (
        (new_state.online_batch_stats, online_stats),
        (new_state.target_batch_stats, target_stats),
    ):
        means = lambda t: [
            leaf for path, leaf in jax.tree_util.tree_leaves_with_path(t) if path[-1].key == "mean"
        ]
        for a, b in zip(means(ours), means(seed), strict=True):
            np.testing.assert_allclose(a, b, **TOL)


@pytest.mark.parametrize("hidden_layer", ["avgpool", -2])
def test_embeddings_match_seed_in_eval_mode(hidden_layer):
    learner = _learner("byol", hidden_layer)
    state, images = _seed_state("byol", learner, optax.sgd(0.5))
    proj, rep = learner.embed(state, images, return_projection=True)
    np.testing.assert_allclose(rep, GOLDEN["byol/embed_eval/representation"], **TOL)
    np.testing.assert_allclose(proj, GOLDEN["byol/embed_eval/projection"], **TOL)
    # Without the projection, the representation alone, by the cheaper path.
    np.testing.assert_allclose(
        learner.embed(state, images), GOLDEN["byol/embed_eval/representation"], **TOL
    )


def _largest_update(before, after):
    return max(
        1.0, max(jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), after, before)))
    )


def _assert_same_step(before, ours, seed, lr):
    """Parameters after one SGD step agree to 1e-5 of the largest update. Leaves whose true
    gradient is 0 (biases that feed a BatchNorm, which removes any constant shift) carry
    only float32 round-off on both sides: there both gradients must be below 1e-4."""
    close = dict(rtol=1e-5, atol=1e-5 * _largest_update(before, seed))
    for (path, b), o, s in zip(
        jax.tree_util.tree_leaves_with_path(before),
        jax.tree.leaves(ours),
        jax.tree.leaves(seed),
        strict=True,
    ):
        seed_grad, our_grad = (b - s) / lr, (b - o) / lr
        if np.abs(seed_grad).max() < 1e-4:
            assert np.abs(our_grad).max() < 1e-4, jax.tree_util.keystr(path)
        else:
            np.testing.assert_allclose(o, s, **close, err_msg=jax.tree_util.keystr(path))
