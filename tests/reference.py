"""An independent BYOL, written from the paper in plain jax.numpy, to check byol_jax against.

Nothing here imports byol_jax: the networks (a BasicBlock ResNet with the 3x3 stem, the
projector / predictor MLPs), BatchNorm with its running statistics, the symmetrised loss,
the online probe, LARS, the learning-rate and tau schedules and the EMA are all written
again from their definitions (docs/recipe.md). Parameters are read from byol_jax's trees
by name, so the same numbers go into both implementations.

BatchNorm statistics are always those of the whole (global) batch passed in: the checks
compare this single-device computation with byol_jax mapped over several devices, where
cross-replica BatchNorm must give exactly these statistics.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

BN_DECAY, BN_EPS = 0.9, 1e-5


# ----------------------------------------------------------------------------- layers


def batch_norm(x, params, stats, *, affine=True):
    """Training-mode BatchNorm over every axis but the last: (y, new running statistics).
    The running variance is updated with the biased batch variance, as in the authors' code."""
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    var = jnp.mean(jnp.square(x - mean), axes)
    y = (x - mean) / jnp.sqrt(var + BN_EPS)
    if affine:
        y = y * params["scale"] + params["bias"]
    new = {
        "mean": BN_DECAY * stats["mean"] + (1 - BN_DECAY) * mean,
        "var": BN_DECAY * stats["var"] + (1 - BN_DECAY) * var,
    }
    return y, new


def conv(x, kernel, stride=1):
    """'SAME'-sized convolution with symmetric padding (k // 2), NHWC x HWIO."""
    pad = kernel.shape[0] // 2
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        [(pad, pad), (pad, pad)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )


def dense(x, params):
    y = jnp.dot(x, params["kernel"], precision=jax.lax.Precision.HIGHEST)
    return y + params["bias"] if "bias" in params else y


# ----------------------------------------------------------------------------- networks


def basic_block(x, p, s, stride):
    """3x3 conv, BN, ReLU, 3x3 conv, BN, plus the (projected) shortcut, ReLU."""
    new = {}
    y = conv(x, p["Conv_0"]["kernel"], stride)
    y, new["BatchNorm_0"] = batch_norm(y, p["BatchNorm_0"], s["BatchNorm_0"])
    y = conv(jax.nn.relu(y), p["Conv_1"]["kernel"])
    y, new["BatchNorm_1"] = batch_norm(y, p["BatchNorm_1"], s["BatchNorm_1"])
    shortcut = x
    if "shortcut_conv" in p:
        shortcut = conv(x, p["shortcut_conv"]["kernel"], stride)
        shortcut, new["shortcut_bn"] = batch_norm(shortcut, p["shortcut_bn"], s["shortcut_bn"])
    return jax.nn.relu(shortcut + y), new


def resnet(x, p, s):
    """A BasicBlock ResNet with the 3x3 stem (blocks named stage<i>_block<j>) -> pooled [N, C]."""
    new = {}
    y = conv(x, p["stem_conv"]["kernel"])
    y, new["stem_bn"] = batch_norm(y, p["stem_bn"], s["stem_bn"])
    y = jax.nn.relu(y)
    blocks = sorted(
        (k for k in p if k.startswith("stage")),
        key=lambda k: tuple(int(n) for n in k[5:].split("_block")),
    )
    for name in blocks:
        stage, index = (int(n) for n in name[5:].split("_block"))
        stride = 2 if stage > 1 and index == 1 else 1
        y, new[name] = basic_block(y, p[name], s[name], stride)
    return jnp.mean(y, axis=(1, 2)), new


def mlp(x, p, s):
    """Dense, BN, ReLU, Dense: BYOL's projector and predictor."""
    y = dense(x, p["Dense_0"])
    y, bn = batch_norm(y, p["BatchNorm_0"], s["BatchNorm_0"])
    return dense(jax.nn.relu(y), p["Dense_1"]), {"BatchNorm_0": bn}


def project(x, params, stats):
    """Encoder + projector: (projection, representation, new stats)."""
    rep, enc = resnet(x, params["encoder"], stats["encoder"])
    proj, prj = mlp(rep, params["projector"], stats["projector"])
    return proj, rep, {**stats, "encoder": enc, "projector": prj}


def online(x, params, stats):
    """Encoder + projector + predictor: (prediction, representation, new stats)."""
    proj, rep, stats = project(x, params, stats)
    pred, prd = mlp(proj, params["predictor"], stats["predictor"])
    return pred, rep, {**stats, "predictor": prd}


# ----------------------------------------------------------------------------- the loss


def regression(p, z):
    """2 - 2 cos(p, z) per row."""
    p = p / jnp.linalg.norm(p, axis=-1, keepdims=True)
    z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    return 2 - 2 * jnp.sum(p * z, axis=-1)


def both_views(fn, view1, view2, params, stats, shared):
    """Runs fn on the two views: in one batch (shared BatchNorm statistics) or one view after
    the other, the second starting from the running statistics the first left."""
    if shared:
        out, rep, stats = fn(jnp.concatenate([view1, view2]), params, stats)
        n = len(view1)
        return (out[:n], out[n:]), rep[:n], stats
    out1, rep1, stats = fn(view1, params, stats)
    out2, _, stats = fn(view2, params, stats)
    return (out1, out2), rep1, stats


def byol_loss(online_params, target_params, online_stats, target_stats, view1, view2, shared,
              labels=None):  # fmt: skip
    """The symmetrised BYOL loss (+ the probe's cross-entropy on labelled rows):
    (loss, (new online stats, new target stats, probe sums))."""
    (p1, p2), rep1, online_stats = both_views(
        online, view1, view2, online_params, online_stats, shared
    )
    (t1, t2), _, target_stats = both_views(
        project, view1, view2, target_params, target_stats, shared
    )
    t1, t2 = jax.lax.stop_gradient(t1), jax.lax.stop_gradient(t2)
    loss = jnp.mean(regression(p1, t2) + regression(p2, t1))
    sums = {}
    if labels is not None:
        logits = dense(jax.lax.stop_gradient(rep1), online_params["probe"])
        labelled = labels >= 0
        log_p = jax.nn.log_softmax(logits)
        xent = -jnp.take_along_axis(log_p, jnp.where(labelled, labels, 0)[:, None], 1)[:, 0]
        count = jnp.sum(labelled)
        loss = loss + jnp.sum(jnp.where(labelled, xent, 0)) / jnp.maximum(count, 1)
        correct = jnp.sum(labelled & (jnp.argmax(logits, -1) == labels))
        sums = {"correct": correct, "count": count}
    return loss, (online_stats, target_stats, sums)


# ----------------------------------------------------------------------------- optimisation


def warmup_cosine(step, peak, warmup, total):
    """Linear warm-up from 0 to peak over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return peak * step / warmup
    return (
        peak * 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup) / (total - warmup)))
    )


def cosine_tau(step, base, total):
    """tau_k = 1 - (1 - base) (cos(pi k / K) + 1) / 2."""
    return 1 - (1 - base) * (math.cos(math.pi * min(step / total, 1.0)) + 1) / 2


def lars(params, grads, trace, lr, weight_decay, momentum=0.9, eta=1e-3):
    """The authors' LARS on every leaf: weight decay and the trust ratio for leaves of two or
    more dimensions only, then momentum, then the learning rate. -> (params, trace)."""

    def leaf(w, g, t):
        if w.ndim > 1:
            g = g + weight_decay * w
            w_norm, g_norm = jnp.linalg.norm(w), jnp.linalg.norm(g)
            ratio = jnp.where((w_norm > 0) & (g_norm > 0), eta * w_norm / g_norm, 1.0)
            g = g * ratio
        t = momentum * t + g
        return w - lr * t, t

    pairs = jax.tree.map(leaf, params, grads, trace)
    new_params = jax.tree.map(lambda _, pair: pair[0], params, pairs)
    new_trace = jax.tree.map(lambda _, pair: pair[1], params, pairs)
    return new_params, new_trace


def ema(target, online_params, tau):
    """target <- tau target + (1 - tau) online, for the parts the target has."""
    return {
        k: jax.tree.map(lambda t, o: tau * t + (1 - tau) * o, target[k], online_params[k])
        for k in target
    }
