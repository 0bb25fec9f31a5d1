"""Networks of BYOL: ResNet v1 encoders and the projector / predictor MLPs.

Nothing here knows about BYOL: these are plain Flax Linen modules. Every module takes
images or features in the NHWC / [N, D] layout and a ``train`` flag that switches
BatchNorm between batch statistics (and updating ``batch_stats``) and running averages.

``axis_name`` on a module makes its BatchNorm layers average their batch statistics over
that mapped axis (cross-replica BatchNorm under ``jax.pmap`` / ``jax.shard_map``). The BYOL
learner sets it when the step runs over several devices; a user-written encoder that wants
the same declares an ``axis_name: str | None = None`` field and passes it to its BatchNorms.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from byol_jax.batchnorm import BatchNorm

# BatchNorm settings of the BYOL paper's official code (decay 0.9, eps 1e-5); they are
# also PyTorch's defaults (momentum 0.1 there means decay 0.9 here).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


# XLA's CPU convolutions get slower per image as the batch grows (ResNet-18 forward+backward,
# 32 px, on a 2-core AVX-512 CPU: 58.7 images/s at batch 32, 37.5 at 256), while a
# convolution treats every image on its own. So on the CPU a ResNet carries its batch as a
# tuple of slices of CPU_CONV_CHUNK images or more, at most MAX_CONV_SLICES of them, from the
# stem to the pooling: each convolution runs once per slice, and BatchNorm normalises all
# slices with the statistics of the whole batch, so the function computed is unchanged.
# Slicing only around each convolution (and joining the slices after it) cost XLA a
# concatenation and slice copies per layer, and slower weight-gradient transposes: 243 of
# the step's 1,859 ms of op time at base width 16 (benchmarks/step_profile.py). Compile time
# grows with the number of slices.
CPU_CONV_CHUNK = 16
MAX_CONV_SLICES = 8


def conv_chunk_for_backend(conv_chunk: int | str | None) -> int | None:
    """'auto' -> CPU_CONV_CHUNK on the CPU backend, None (whole batch) elsewhere."""
    if conv_chunk == "auto":
        return CPU_CONV_CHUNK if jax.default_backend() == "cpu" else None
    if conv_chunk is not None and (not isinstance(conv_chunk, int) or conv_chunk < 1):
        raise ValueError(
            f"conv_chunk must be 'auto', None or a positive number of images, got {conv_chunk!r}."
        )
    return conv_chunk


def split_batch(x: jax.Array, chunk: int | None) -> tuple[jax.Array, ...]:
    """[N, ...] -> a tuple of slices of at least ``chunk`` images, at most MAX_CONV_SLICES of
    them (None, or a batch of ``chunk`` or fewer: one slice)."""
    n = x.shape[0]
    if chunk is None or n <= chunk:
        return (x,)
    size = max(chunk, -(-n // MAX_CONV_SLICES))
    return tuple(x[i : i + size] for i in range(0, n, size))


def join_batch(x):
    """The inverse of ``split_batch``: a tuple of slices -> one array (an array unchanged)."""
    if not isinstance(x, tuple):
        return x
    return x[0] if len(x) == 1 else jnp.concatenate(x, axis=0)


class Conv(nn.Conv):
    """``nn.Conv`` that also takes a batch as a tuple of slices (``split_batch``) and
    convolves each with the same kernel: same parameters, same outputs."""

    def __call__(self, inputs):
        if isinstance(inputs, tuple):
            return tuple(super(Conv, self).__call__(x) for x in inputs)
        return super().__call__(inputs)


def _batch_norm(train: bool, axis_name: str | None, dtype: Any, **kwargs) -> BatchNorm:
    return BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        axis_name=axis_name,
        dtype=dtype,
        **kwargs,
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    filters: int
    strides: int = 1
    axis_name: str | None = None
    dtype: Any = jnp.float32
    zero_init_residual: bool = False
    padding: str = "symmetric"

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(Conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(_batch_norm, train, self.axis_name, self.dtype)
        residual = x
        y = conv(self.filters, (3, 3), self.strides, padding=_pad(self.padding, 1))(x)
        y = norm(relu=True)(y)
        y = conv(self.filters, (3, 3), padding=_pad(self.padding, 1))(y)
        return _last_norm(residual, y, self.strides, conv, norm, self.zero_init_residual)


class BottleneckBlock(nn.Module):
    """1x1, 3x3, 1x1 convolutions with a 4x expansion (ResNet-50 and deeper)."""

    filters: int
    strides: int = 1
    axis_name: str | None = None
    dtype: Any = jnp.float32
    zero_init_residual: bool = False
    padding: str = "symmetric"

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(Conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(_batch_norm, train, self.axis_name, self.dtype)
        residual = x
        y = norm(relu=True)(conv(self.filters, (1, 1))(x))
        # ResNet v1.5 (torchvision, flax and the BYOL code): the stride sits on the 3x3 conv.
        y = norm(relu=True)(
            conv(self.filters, (3, 3), self.strides, padding=_pad(self.padding, 1))(y)
        )
        y = conv(self.filters * 4, (1, 1))(y)
        return _last_norm(residual, y, self.strides, conv, norm, self.zero_init_residual)


def _pad(padding: str, pixels: int):
    """'symmetric': ``pixels`` on every side (torchvision); 'same': XLA's SAME, which puts the
    odd pixel of a strided convolution or max-pool at the bottom/right (the authors' Haiku
    code): the two differ for the 7x7 stem, the max-pool and the strided 3x3 convolutions."""
    if padding == "same":
        return "SAME"
    return ((pixels, pixels), (pixels, pixels))


PADDINGS = ("symmetric", "same")


def _last_norm(x, y, strides, conv, norm, zero_init_residual):
    """relu(BatchNorm(y) + shortcut), the block's end, with the shortcut x itself or a
    strided 1x1 projection where the shapes differ. The projection's layers are named, so
    making them before the last BatchNorm leaves that one's automatic name as it was
    (checkpoints and imported weights keep their keys)."""
    if _shape(x) != _shape(y):
        x = conv(_shape(y)[-1], (1, 1), strides, name="shortcut_conv")(x)
        x = norm(name="shortcut_bn")(x)
    return norm(scale_init=_last_scale_init(zero_init_residual), relu=True)(y, residual=x)


def _shape(x) -> tuple[int, ...]:
    """The shape of an array or of the slices of one (all but the batch are the same)."""
    return x[0].shape[1:] if isinstance(x, tuple) else x.shape[1:]


def _last_scale_init(zero: bool):
    return nn.initializers.zeros if zero else nn.initializers.ones


class ResNet(nn.Module):
    """ResNet v1 encoder: images [N, H, W, C] -> pooled representation [N, D].

    ``width_multiplier`` scales every layer's channels (the paper's x2, x4). ``padding``:
    'symmetric' (torchvision's, the default) or 'same' (XLA's SAME, the authors' Haiku code,
    what their released weights expect). ``cifar_stem``
    replaces the 7x7/2 convolution and max-pool with one 3x3/1 convolution, as small
    (32 px) images need. With ``num_classes`` a linear head is added and the module
    returns logits; its pooled features are then the output of the ``avgpool`` submodule
    (use ``hidden_layer='avgpool'``), as in torchvision. ``conv_chunk`` is how many images
    each slice of the batch holds at least ('auto': ``CPU_CONV_CHUNK`` on the CPU, one slice
    elsewhere); a submodule's output is then a tuple of slices (``join_batch`` joins it).
    """

    stage_sizes: Sequence[int]
    block: type[nn.Module] = BasicBlock
    num_filters: int = 64
    width_multiplier: int = 1
    cifar_stem: bool = False
    num_classes: int | None = None
    zero_init_residual: bool = False
    axis_name: str | None = None
    dtype: Any = jnp.float32
    conv_chunk: int | str | None = "auto"
    padding: str = "symmetric"

    @nn.compact
    def __call__(self, x, train: bool = True):
        if self.padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {self.padding!r}.")
        width = self.num_filters * self.width_multiplier
        chunk = conv_chunk_for_backend(self.conv_chunk)
        x = x.astype(self.dtype)
        # The batch travels as a tuple of slices from here to the pooling (CPU_CONV_CHUNK).
        x = split_batch(x, chunk)
        stem = functools.partial(Conv, width, use_bias=False, dtype=self.dtype)
        if self.cifar_stem:
            x = stem((3, 3), padding=1, name="stem_conv")(x)
        else:
            x = stem((7, 7), 2, padding=_pad(self.padding, 3), name="stem_conv")(x)
        x = _batch_norm(train, self.axis_name, self.dtype, relu=True, name="stem_bn")(x)
        if not self.cifar_stem:
            x = tuple(
                nn.max_pool(s, (3, 3), strides=(2, 2), padding=_pad(self.padding, 1)) for s in x
            )
        for stage, num_blocks in enumerate(self.stage_sizes):
            for index in range(num_blocks):
                x = self.block(
                    filters=width * 2**stage,
                    strides=2 if stage > 0 and index == 0 else 1,
                    axis_name=self.axis_name,
                    dtype=self.dtype,
                    zero_init_residual=self.zero_init_residual,
                    padding=self.padding,
                    name=f"stage{stage + 1}_block{index + 1}",
                )(x, train)
        x = GlobalAvgPool(name="avgpool")(x)
        if self.num_classes is not None:
            x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
        return x


class GlobalAvgPool(nn.Module):
    """[N, H, W, C] (or a tuple of slices of it) -> [N, C] mean over the spatial axes, in
    float32."""

    @nn.compact
    def __call__(self, x):
        slices = x if isinstance(x, tuple) else (x,)
        return join_batch(tuple(jnp.mean(s.astype(jnp.float32), axis=(1, 2)) for s in slices))


_STAGES = {
    18: ((2, 2, 2, 2), BasicBlock),
    34: ((3, 4, 6, 3), BasicBlock),
    50: ((3, 4, 6, 3), BottleneckBlock),
    101: ((3, 4, 23, 3), BottleneckBlock),
    152: ((3, 8, 36, 3), BottleneckBlock),
    200: ((3, 24, 36, 3), BottleneckBlock),
}


def resnet(depth: int, **kwargs) -> ResNet:
    """ResNet v1 of the given depth (18, 34, 50, 101, 152 or 200)."""
    if depth not in _STAGES:
        raise ValueError(f"ResNet depth {depth!r} is not one of {sorted(_STAGES)}.")
    stage_sizes, block = _STAGES[depth]
    return ResNet(stage_sizes=stage_sizes, block=block, **kwargs)


ResNet18 = functools.partial(resnet, 18)
ResNet34 = functools.partial(resnet, 34)
ResNet50 = functools.partial(resnet, 50)
ResNet101 = functools.partial(resnet, 101)
ResNet152 = functools.partial(resnet, 152)
ResNet200 = functools.partial(resnet, 200)


def tiny_resnet(**kwargs) -> ResNet:
    """A two-stage ResNet with 4 base channels and a 3x3 stem, for tests (~2k parameters)."""
    kwargs.setdefault("num_filters", 4)
    kwargs.setdefault("cifar_stem", True)
    return ResNet(stage_sizes=(1, 1), block=BasicBlock, **kwargs)


def encoder_by_name(
    name: str, stage_sizes: Sequence[int] = (), bottleneck: bool = True, **kwargs
) -> nn.Module:
    """'resnet18' ... 'resnet200', 'tiny', or 'resnet' with ``stage_sizes`` (blocks per
    stage) and ``bottleneck`` (BottleneckBlock or BasicBlock): any ResNet v1. Configs name
    encoders this way."""
    if name == "tiny":
        return tiny_resnet(**kwargs)
    if name == "resnet":
        if not stage_sizes or any(int(n) < 1 for n in stage_sizes):
            raise ValueError(
                f"encoder 'resnet' needs stage_sizes, blocks per stage such as (3, 4, 6, 3); got "
                f"{tuple(stage_sizes)}."
            )
        block = BottleneckBlock if bottleneck else BasicBlock
        return ResNet(stage_sizes=tuple(int(n) for n in stage_sizes), block=block, **kwargs)
    if name.startswith("resnet") and name[6:].isdigit():
        return resnet(int(name[6:]), **kwargs)
    raise ValueError(
        f"Unknown encoder {name!r}: use 'tiny', 'resnet' followed by one of {sorted(_STAGES)}, "
        "or 'resnet' with stage_sizes."
    )


def total_stride(encoder: nn.Module) -> int:
    """How much a ResNet downsamples its input (1 for other modules: unknown)."""
    if not isinstance(encoder, ResNet):
        return 1
    return (1 if encoder.cifar_stem else 4) * 2 ** (len(encoder.stage_sizes) - 1)


class MLP(nn.Module):
    """BYOL projector / predictor: Dense -> BatchNorm -> ReLU -> Dense. [N, D] -> [N, out]."""

    hidden_size: int = 4096
    output_size: int = 256
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Dense(self.hidden_size, dtype=self.dtype)(x)
        x = _batch_norm(train, self.axis_name, self.dtype, relu=True)(x)
        return nn.Dense(self.output_size, dtype=self.dtype)(x)


class SimSiamMLP(nn.Module):
    """SimSiam projector of the seed: three bias-free Dense layers, each followed by BatchNorm
    (ReLU after the first two; the last BatchNorm has no scale or offset)."""

    hidden_size: int = 4096
    output_size: int = 256
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        norm = functools.partial(_batch_norm, train, self.axis_name, self.dtype)
        for _ in range(2):
            x = norm(relu=True)(nn.Dense(self.hidden_size, use_bias=False, dtype=self.dtype)(x))
        x = nn.Dense(self.output_size, use_bias=False, dtype=self.dtype)(x)
        return norm(use_scale=False, use_bias=False)(x)
