"""BatchNorm for the networks of BYOL, with its gradient written out and ReLU fused in.

``BatchNorm`` is ``flax.linen.BatchNorm`` (the same parameters ``scale`` / ``bias``, the same
``batch_stats`` ``mean`` / ``var``, the same two-pass statistics in float32, averaged over
``axis_name`` when given) with two differences in how it is computed, not in what:

* In training mode its backward pass is written by hand (``jax.custom_vjp``) rather than
  derived by JAX. Autodiff of normalise -> scale -> ReLU keeps several full-size
  intermediates and reads them in several passes; the hand-written rule keeps only the
  input and the output and needs two passes (two sums, then the input gradient). These
  passes are memory-bound: at the quickstart's width (16 channels, 32 px, 256 images)
  BatchNorm + ReLU forward and backward ran 1.5-2.4x faster this way than by autodiff on the
  development CPU (``benchmarks/batchnorm_step.py``, README "Measured").
* ``relu=True`` applies ReLU to the result, and ``residual`` adds a tensor before it
  (ResNet's ``relu(bn(y) + shortcut)``), inside the same rule.
* It takes the batch whole or as a tuple of slices (``networks.split_batch``), normalised
  with the statistics of all of them.

The gradient is the usual one, for the statistics of the whole (cross-replica) batch:
``dx = scale / sigma * (g - mean(g) - x_hat * mean(g * x_hat))``, where ``g`` is the
incoming gradient masked by the ReLU; ``tests/test_batchnorm.py`` checks it against autodiff
of ``flax.linen.BatchNorm``, whole and in slices, on one device and across eight.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


class BatchNorm(nn.Module):
    """Batch normalisation over every axis but the last, then optionally ``+ residual`` and
    ReLU. ``x`` [..., C] -> [..., C] in ``dtype`` (default: the input's).

    ``use_running_average=True`` normalises with the stored averages (evaluation);
    otherwise with the batch's statistics, which then update the averages (not while
    initialising, as in Flax). The statistics take no gradient: they only feed the averages.
    """

    use_running_average: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    axis_name: str | None = None
    dtype: Any = None
    use_scale: bool = True
    use_bias: bool = True
    scale_init: Any = nn.initializers.ones
    bias_init: Any = nn.initializers.zeros
    relu: bool = False

    @nn.compact
    def __call__(self, x, residual=None):
        """x: [..., C], or a tuple of slices of one batch (``networks.split_batch`` makes
        them on the CPU), normalised together; ``residual`` like x. Returns the same
        structure."""
        sliced = isinstance(x, tuple)
        xs, rs = (x, residual) if sliced else ((x,), None if residual is None else (residual,))
        features = (xs[0].shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        scale = jnp.ones(features, jnp.float32)
        if self.use_scale:
            scale = self.param("scale", self.scale_init, features, jnp.float32)
        bias = jnp.zeros(features, jnp.float32)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, features, jnp.float32)
        dtype = self.dtype or xs[0].dtype
        if self.use_running_average:
            inv = lax.rsqrt(ra_var.value + self.epsilon)
            ys = _normalize(xs, ra_mean.value, inv, scale, bias, rs or (), self.relu, dtype)
        else:
            # While initialising, the axis need not exist (as in Flax).
            axis = None if self.is_initializing() else self.axis_name
            ys, mean, var = batch_norm(xs, scale, bias, rs, self.epsilon, axis, self.relu, dtype)
            if not self.is_initializing():
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return ys if sliced else ys[0]


def _normalize(xs, mean, inv, scale, bias, residuals, relu, dtype):
    """Each slice normalised with the given statistics, scaled and shifted [+ its residual]
    [-> ReLU], in ``dtype``; ``residuals`` is () when there are none."""
    residuals = residuals or (None,) * len(xs)
    ys = []
    for x, r in zip(xs, residuals, strict=True):
        y = (x.astype(jnp.float32) - mean) * (inv * scale) + bias
        if r is not None:
            y = y + r.astype(jnp.float32)
        ys.append((jax.nn.relu(y) if relu else y).astype(dtype))
    return tuple(ys)


def _rows(xs) -> int:
    """How many rows (values per channel) the slices hold together."""
    return sum(x.size // x.shape[-1] for x in xs)


def _channel_sum(xs):
    """[C]: the sum over every axis but the last, and over all slices."""
    return sum(jnp.sum(x, axis=tuple(range(x.ndim - 1))) for x in xs)


def _mean(xs, axis_name):
    """Mean over every axis but the last of all slices, and over ``axis_name`` (replicas
    holding equally many rows, as Flax assumes)."""
    m = _channel_sum(xs) / _rows(xs)
    return m if axis_name is None else lax.pmean(m, axis_name)


def batch_norm(xs, scale, bias, residuals, epsilon, axis_name, relu, dtype):
    """Training-mode BatchNorm [+ residual] [-> ReLU] of the slices ``xs`` (a tuple of
    [..., C] arrays) with the statistics of all of them: returns (the tuple of outputs in
    ``dtype``, mean [C], var [C]); mean and var are float32 under stop-gradient."""
    scale, bias = _vary_like(scale, xs[0]), _vary_like(bias, xs[0])
    # float32 here: autodiff of this cast gives the residual's gradient in its own dtype.
    # No residual is () (a pytree without leaves: nothing to differentiate).
    residuals = () if residuals is None else tuple(r.astype(jnp.float32) for r in residuals)
    ys, mean, var = _batch_norm(xs, scale, bias, residuals, epsilon, axis_name, relu, dtype)
    return ys, lax.stop_gradient(mean), lax.stop_gradient(var)


def _vary_like(a, x):
    """``a`` (the same on every replica) marked as varying over the mapped axes that ``x``
    varies over, as JAX does on its own where ``a`` meets ``x`` in an operation: autodiff
    then sums its gradient over those axes, so the hand-written rule may return each
    replica's own part of it. Outside ``shard_map`` nothing varies and ``a`` is returned."""
    axes = tuple(sorted(_varying_axes(x) - _varying_axes(a)))
    if not axes:
        return a
    if hasattr(lax, "pcast"):  # newer JAX
        return lax.pcast(a, axes, to="varying")
    return lax.pvary(a, axes)


def _varying_axes(x) -> frozenset:
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # JAX 0.10 and later
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))  # JAX 0.8 and 0.9


def _forward(xs, scale, bias, residuals, epsilon, axis_name, relu, dtype):
    xs = tuple(x.astype(jnp.float32) for x in xs)  # statistics in float32, as Flax
    mean = _mean(xs, axis_name)
    # Two passes, as Flax's use_fast_variance=False: no cancellation when |mean| >> std.
    var = _mean(tuple(jnp.square(x - mean) for x in xs), axis_name)
    inv = lax.rsqrt(var + epsilon)
    return _normalize(xs, mean, inv, scale, bias, residuals, relu, dtype), mean, var, inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _batch_norm(xs, scale, bias, residuals, epsilon, axis_name, relu, dtype):
    ys, mean, var, _ = _forward(xs, scale, bias, residuals, epsilon, axis_name, relu, dtype)
    return ys, mean, var


def _batch_norm_fwd(xs, scale, bias, residuals, epsilon, axis_name, relu, dtype):
    ys, mean, var, inv = _forward(xs, scale, bias, residuals, epsilon, axis_name, relu, dtype)
    # Saved: the input and (for ReLU's mask) the output, which the next layer keeps anyway.
    # Of the residuals only whether there are any is read: XLA drops the unused arrays.
    return (ys, mean, var), (xs, ys if relu else None, mean, inv, scale, residuals)


def _batch_norm_bwd(epsilon, axis_name, relu, dtype, saved, cotangents):
    """(dxs, dscale, dbias, dresiduals) from the outputs' gradients; the cotangents of mean
    and var are ignored: the caller puts them under stop-gradient."""
    xs, ys, mean, inv, scale, residuals = saved
    dys = cotangents[0]
    gs = tuple(dy.astype(jnp.float32) for dy in dys)
    if relu:  # ReLU's mask, read from the saved output
        gs = tuple(jnp.where(y > 0, g, 0.0) for y, g in zip(ys, gs, strict=True))
    x_hats = tuple((x.astype(jnp.float32) - mean) * inv for x in xs)
    dbias = _channel_sum(gs)
    dscale = _channel_sum(tuple(g * x_hat for g, x_hat in zip(gs, x_hats, strict=True)))
    # The statistics are those of the whole batch across replicas: so are these means.
    mean_g, mean_gx = dbias / _rows(xs), dscale / _rows(xs)
    if axis_name is not None:
        mean_g, mean_gx = lax.pmean((mean_g, mean_gx), axis_name)
    dxs = tuple(
        ((scale * inv) * (g - mean_g - x_hat * mean_gx)).astype(x.dtype)
        for g, x_hat, x in zip(gs, x_hats, xs, strict=True)
    )
    # The residual's gradient is the (masked) output gradient itself.
    return dxs, dscale, dbias, gs if residuals else ()


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)
