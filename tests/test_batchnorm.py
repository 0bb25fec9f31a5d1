"""byol_jax.batchnorm against flax.linen.BatchNorm differentiated by JAX: outputs, gradients
and running statistics, whole or in slices, with ReLU and a residual, on one device and
across eight (cross-replica statistics)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from byol_jax import networks
from byol_jax.batchnorm import BatchNorm

C = 6


def _inputs(n=24):
    keys = jax.random.split(jax.random.key(0), 3)
    x = 3.0 + 2.0 * jax.random.normal(keys[0], (n, 5, 4, C))  # a mean far from zero
    residual = jax.random.normal(keys[1], (n, 5, 4, C))
    weights = jax.random.normal(keys[2], (n, 5, 4, C))  # what the loss weighs outputs by
    params = {"scale": jnp.linspace(0.5, 1.5, C), "bias": jnp.linspace(-0.3, 0.2, C)}
    stats = {"mean": jnp.linspace(-1, 1, C), "var": jnp.linspace(0.5, 2, C)}
    return x, residual, weights, params, stats


class _Flax(nn.Module):
    """What the networks wrote before: nn.BatchNorm, then + residual, then ReLU."""

    relu: bool
    train: bool = True
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, residual=None):
        y = nn.BatchNorm(
            use_running_average=not self.train,
            momentum=0.9,
            epsilon=1e-5,
            use_fast_variance=False,
            axis_name=self.axis_name,
            name="bn",
        )(x)
        y = y if residual is None else y + residual
        return nn.relu(y) if self.relu else y


class _Ours(nn.Module):
    relu: bool
    train: bool = True
    axis_name: str | None = None
    slices: int | None = None

    @nn.compact
    def __call__(self, x, residual=None):
        bn = BatchNorm(
            use_running_average=not self.train,
            relu=self.relu,
            axis_name=self.axis_name,
            name="bn",
        )
        if self.slices is None:
            return bn(x, residual=residual)
        split = functools.partial(networks.split_batch, chunk=x.shape[0] // self.slices)
        y = bn(split(x), residual=None if residual is None else split(residual))
        return networks.join_batch(y)


def _loss_and_grads(module, x, residual, weights, params, stats):
    def loss(x, residual, params):
        variables = {"params": {"bn": params}, "batch_stats": {"bn": stats}}
        y, updates = module.apply(variables, x, residual, mutable=["batch_stats"])
        return jnp.sum(y * weights), (y, updates["batch_stats"]["bn"])

    argnums = (0, 1, 2) if residual is not None else (0, 2)
    (_, (y, new_stats)), grads = jax.value_and_grad(loss, argnums, has_aux=True)(
        x, residual, params
    )
    return y, new_stats, grads


def _assert_close(a, b, rtol=1e-5):
    """Leaf by leaf, to float32 rounding of the leaf's largest value (a scale's gradient is
    a sum of hundreds of terms that cancel)."""
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        atol = rtol * max(1.0, float(np.max(np.abs(v))))
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


@pytest.mark.parametrize("slices", [None, 3, 4])  # 24 images: whole, 3 of 8, 4 of 6
@pytest.mark.parametrize("relu, with_residual", [(False, False), (True, False), (True, True)])
def test_training_mode_matches_flax_batchnorm(relu, with_residual, slices):
    x, residual, weights, params, stats = _inputs()
    residual = residual if with_residual else None
    expected = _loss_and_grads(_Flax(relu), x, residual, weights, params, stats)
    got = _loss_and_grads(_Ours(relu, slices=slices), x, residual, weights, params, stats)
    _assert_close(got, expected)
    assert bool(jnp.any(got[0] == 0)) == relu  # the ReLU did cut something


def test_evaluation_mode_uses_the_running_averages_like_flax():
    x, residual, weights, params, stats = _inputs()
    variables = {"params": {"bn": params}, "batch_stats": {"bn": stats}}
    expected = _Flax(True, train=False).apply(variables, x, residual)
    got = _Ours(True, train=False).apply(variables, x, residual)
    _assert_close(got, expected)


def test_initialisation_matches_flax_and_leaves_averages_alone():
    x = _inputs()[0]
    ours = _Ours(True).init(jax.random.key(0), x)
    flax_ = _Flax(True).init(jax.random.key(0), x)
    assert jax.tree.structure(ours) == jax.tree.structure(flax_)
    _assert_close(ours, flax_)


def test_the_networks_keep_flax_names_and_defaults():
    variables = networks.tiny_resnet().init(jax.random.key(0), jnp.zeros((2, 8, 8, 3)))
    assert set(variables["params"]["stem_bn"]) == {"scale", "bias"}
    assert set(variables["batch_stats"]["stage1_block1"]["BatchNorm_1"]) == {"mean", "var"}


@pytest.mark.parametrize("relu", [False, True])
def test_cross_replica_statistics_and_gradients_match_flax(relu):
    """Eight replicas of 3 images: each replica's output and gradients, and the averages, are
    those of flax.linen.BatchNorm with the same axis (the whole batch's statistics)."""
    x, residual, weights, params, stats = _inputs()
    mesh = Mesh(np.array(jax.devices()[:8]), ("batch",))
    spec = PartitionSpec("batch")

    def per_replica(module, x, residual, weights):
        y, new_stats, grads = _loss_and_grads(module, x, residual, weights, params, stats)
        # The parameters are the same on every replica: their gradients come back summed
        # over the replicas (the gradient of the summed loss), the same on each.
        return y, new_stats, grads[:2], grads[2]

    def mapped(module):
        fn = functools.partial(per_replica, module)
        out_specs = (spec, PartitionSpec(), (spec, spec), PartitionSpec())
        return jax.jit(
            jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=out_specs)
        )(x, residual, weights)

    expected = mapped(_Flax(relu, axis_name="batch"))
    got = mapped(_Ours(relu, axis_name="batch"))
    _assert_close(got, expected)
    # And both are the whole batch's BatchNorm on one device.
    whole = _loss_and_grads(_Flax(relu), x, residual, weights, params, stats)
    _assert_close(got, (whole[0], whole[1], whole[2][:2], whole[2][2]))


def test_bfloat16_output_and_float32_statistics():
    x, residual, weights, params, stats = _inputs()
    variables = {"params": {"bn": params}, "batch_stats": {"bn": stats}}
    module = BatchNorm(relu=True, dtype=jnp.bfloat16)
    y, updates = module.apply(
        {"params": params, "batch_stats": stats}, x.astype(jnp.bfloat16), mutable=["batch_stats"]
    )
    assert y.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(updates))
    expected = _Flax(True).apply(variables, x, mutable=["batch_stats"])[0]
    np.testing.assert_allclose(np.asarray(y, np.float32), expected, rtol=2e-2, atol=5e-2)
