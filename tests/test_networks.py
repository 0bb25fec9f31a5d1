"""ResNet v1 encoders: torchvision's parameter counts, widths, strides; MLP shapes."""

import re

import jax
import jax.numpy as jnp
import pytest

from byol_jax import networks


def _params(module, size=32):
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((2, size, size, 3)), train=False)
    )
    out = jax.eval_shape(
        lambda v: module.apply(v, jnp.zeros((2, size, size, 3)), train=False), shapes
    )
    return sum(x.size for x in jax.tree.leaves(shapes["params"])), out.shape


@pytest.mark.parametrize(
    "depth, count, dim",
    # torchvision's resnet18 / resnet50 without their 1000-way fc layer.
    [(18, 11_176_512, 512), (50, 23_508_032, 2048)],
)
def test_resnet_matches_torchvision_parameter_counts(depth, count, dim):
    assert _params(networks.resnet(depth)) == (count, (2, dim))


def test_width_multiplier_and_classifier_head():
    count, shape = _params(networks.ResNet50(width_multiplier=2))
    assert shape == (2, 4096)  # the paper's ResNet-50 x2 has a 4096-d representation
    assert _params(networks.ResNet18(num_classes=10))[1] == (2, 10)


def test_total_stride():
    assert networks.total_stride(networks.ResNet50()) == 32
    assert networks.total_stride(networks.ResNet18(cifar_stem=True)) == 8
    assert networks.total_stride(networks.tiny_resnet()) == 2


def test_unknown_depth_and_name():
    with pytest.raises(ValueError, match="not one of"):
        networks.resnet(7)
    with pytest.raises(ValueError, match="Unknown encoder 'vgg'"):
        networks.encoder_by_name("vgg")


def test_simsiam_projector_shapes():
    params = jax.eval_shape(
        lambda: networks.SimSiamMLP(32, 8).init(jax.random.key(0), jnp.zeros((2, 16)))
    )
    dense = {k: v["kernel"].shape for k, v in params["params"].items() if k.startswith("Dense")}
    assert dense == {"Dense_0": (16, 32), "Dense_1": (32, 32), "Dense_2": (32, 8)}
    assert "BatchNorm_2" not in params["params"]  # no scale or offset on the last BatchNorm


def _conv_outputs_and_grads(module, x):
    variables = module.init(jax.random.key(0), x[:2], train=True)

    def loss(params):
        out, _ = module.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(out**2), out

    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    return variables, out, grads


@pytest.mark.parametrize("batch", [21, 100])  # a ragged last slice; more than MAX_CONV_SLICES
def test_sliced_convolutions_compute_the_same_function(batch):
    x = jax.random.normal(jax.random.key(1), (batch, 8, 8, 3))
    whole = networks.tiny_resnet(conv_chunk=None)
    sliced = networks.tiny_resnet(conv_chunk=4)
    v_whole, out_whole, g_whole = _conv_outputs_and_grads(whole, x)
    v_sliced, out_sliced, g_sliced = _conv_outputs_and_grads(sliced, x)
    # Same parameter tree (checkpoints move between backends), outputs and gradients.
    assert jax.tree.structure(v_whole) == jax.tree.structure(v_sliced)
    assert jnp.allclose(out_whole, out_sliced, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_whole), jax.tree.leaves(g_sliced), strict=True):
        assert jnp.allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "batch, chunk, slices",
    [
        (100, 4, [13] * 7 + [9]),  # 25 slices of 4 would be too many: at most 8, of 13
        (20, 4, [4] * 5),
        (21, 4, [4] * 5 + [1]),
        (16, 16, [16]),  # no more images than a chunk: one call
    ],
)
def test_sliced_convolution_slices_are_what_the_rule_says(batch, chunk, slices):
    x = jnp.zeros((batch, 8, 8, 3))
    assert [s.shape[0] for s in networks.split_batch(x, chunk)] == slices
    # The ResNet convolves each slice on its own and joins them only after the pooling.
    net = networks.tiny_resnet(conv_chunk=chunk)
    variables = net.init(jax.random.key(0), x[:2], train=False)
    hlo = jax.jit(lambda v, x: net.apply(v, x, train=True, mutable=["batch_stats"])).lower(
        variables, x
    )
    text = hlo.as_text()
    stem = re.findall(r"stablehlo.convolution.*?\(tensor<(\d+)x8x8x3xf32>", text)
    assert [int(n) for n in stem] == slices
    # Any join of 4-D activations would be a concatenate too: only the pooled [N, 8] one is.
    joins = re.findall(r"stablehlo.concatenate.*", text)
    assert len(joins) == (1 if len(slices) > 1 else 0)
    assert all(f"-> tensor<{batch}x8xf32>" in join for join in joins)


def test_conv_chunk_setting():
    assert networks.conv_chunk_for_backend("auto") == (
        networks.CPU_CONV_CHUNK if jax.default_backend() == "cpu" else None
    )
    assert networks.conv_chunk_for_backend(None) is None
    with pytest.raises(ValueError, match="conv_chunk must be"):
        networks.conv_chunk_for_backend(0)


def test_a_hidden_layer_inside_a_sliced_resnet_gives_the_whole_batch():
    """A block's output is a tuple of slices on the CPU; the learner's representation from
    it is the whole batch's, as without slices."""
    from byol_jax import encoders

    x = jax.random.normal(jax.random.key(1), (21, 8, 8, 3))
    whole = encoders.adapt(networks.tiny_resnet(conv_chunk=None), "stage1_block1")
    sliced = encoders.adapt(networks.tiny_resnet(conv_chunk=4), "stage1_block1")
    params, stats = whole.init(jax.random.key(0), x[:2])
    for train in (True, False):
        a, _ = whole.represent(params, stats, x, train=train)
        b, _ = sliced.represent(params, stats, x, train=train)
        assert a.shape == b.shape == (21, 8 * 8 * 4)
        assert jnp.allclose(a, b, atol=1e-5)
