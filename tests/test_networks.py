"""ResNet v1 encoders: torchvision's parameter counts, widths, strides; MLP shapes."""

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
