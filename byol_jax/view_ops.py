"""The per-image operations a view applies, one image at a time ([H, W, C] float in [0, 1];
vmap them over a batch): the crop-box draw, the colour jitter in a given order, grayscale,
the Gaussian blur, and ``per_image`` to turn per-image code into a batch view.

dm-pix supplies brightness, contrast, HSV saturation and hue; grayscale and the blur are
written here because their dm-pix versions run several times slower under vmap on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import dm_pix as pix
import jax
import jax.numpy as jnp

from byol_jax import image_ops

AugmentFn = Callable[[jax.Array, jax.Array], jax.Array]


def random_resized_crop_box(
    key: jax.Array,
    height: int,
    width: int,
    area_range: tuple[float, float] = (0.08, 1.0),
    ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
    num_tries: int = image_ops.CROP_TRIES,
) -> jax.Array:
    """torchvision's RandomResizedCrop box (:func:`byol_jax.image_ops.sample_crop_box`)
    drawn from ``key``: float32 ``[4]`` ``(top, left, height, width)`` in input pixels.

    Each of area, ratio, top and left owns a subkey; top and left are one draw each,
    used by whichever try fits.
    """
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    u = jnp.stack(
        [
            jax.random.uniform(k_area, (num_tries,)),
            jax.random.uniform(k_ratio, (num_tries,)),
            jnp.full((num_tries,), jax.random.uniform(k_top)),
            jnp.full((num_tries,), jax.random.uniform(k_left)),
        ]
    )
    return image_ops.sample_crop_box(u, height, width, area_range, ratio_range, xp=jnp)


def color_jitter(
    image: jax.Array,
    order: jax.Array,
    brightness: jax.Array | float,
    contrast: jax.Array | float,
    saturation: jax.Array | float,
    hue: jax.Array | float,
    style: str = "byol",
) -> jax.Array:
    """Applies brightness, contrast, saturation and hue in ``order``, clipping after each.

    Args:
      image: ``[H, W, 3]`` float in [0, 1].
      order: int ``[4]``, a permutation of 0..3 (0 brightness, 1 contrast, 2 saturation,
        3 hue).
      brightness: additive delta (``'byol'``) or multiplicative factor (``'torchvision'``).
      contrast, saturation: factors (1 = unchanged).
      hue: shift of the hue, in turns of the colour wheel.
      style: ``'byol'`` (official BYOL / TF semantics) or ``'torchvision'``.

    Returns:
      ``[H, W, 3]`` float in [0, 1].
    """
    ops = _BYOL_JITTER_OPS if style == "byol" else _TORCHVISION_JITTER_OPS
    amounts = (brightness, contrast, saturation, hue)
    # Each slot applies the op whose index order[slot] holds. A chain of wheres (exactly one
    # fires) rather than lax.switch: vmapped over images, switch computes every branch too
    # but selects among materialised outputs, about 4x slower than this fused chain.
    for slot in range(4):
        for index, (op, amount) in enumerate(zip(ops, amounts, strict=True)):
            fired = jnp.clip(op(image, amount), 0.0, 1.0)
            image = jnp.where(order[slot] == index, fired, image)
    return image


# Rec. 601 luma weights, as dm-pix, TF and torchvision use for grayscale.
_LUMA = (0.2989, 0.5870, 0.1140)


def _luma(image: jax.Array) -> jax.Array:
    """``[H, W, 3]`` -> ``[H, W, 1]`` luma.

    pix.rgb_to_grayscale is a tensordot, which XLA:CPU runs several times slower under
    vmap than this weighted sum of the channels.
    """
    return sum(w * image[..., c : c + 1] for c, w in enumerate(_LUMA))


def grayscale(image: jax.Array) -> jax.Array:
    """Grayscale of ``[H, W, 3]``, kept as 3 channels."""
    return jnp.broadcast_to(_luma(image), image.shape)


def _blend(image: jax.Array, other: jax.Array, factor: jax.Array) -> jax.Array:
    return factor * image + (1.0 - factor) * other


_BYOL_JITTER_OPS = (
    pix.adjust_brightness,
    pix.adjust_contrast,  # per-channel spatial mean, as in the official code
    pix.adjust_saturation,
    pix.adjust_hue,
)
_TORCHVISION_JITTER_OPS = (
    lambda x, f: x * f,
    lambda x, f: _blend(x, jnp.mean(_luma(x)), f),
    lambda x, f: _blend(x, _luma(x), f),
    pix.adjust_hue,
)


def gaussian_blur(
    image: jax.Array, sigma: jax.Array | float, kernel_size: int, padding: str = "zeros"
) -> jax.Array:
    """Separable Gaussian blur of ``[H, W, C]`` with a static odd ``kernel_size``.

    ``'zeros'`` pads with zeros (dm-pix ``SAME``, the official BYOL code); ``'reflect'``
    mirrors the border (torchvision), so edges do not darken.

    Written as a sum of shifted slices rather than with pix.gaussian_blur: vmapped with
    one sigma per image, its depthwise convolution becomes a grouped convolution with
    N * C groups, which XLA:CPU runs about 10x slower. The results agree (tested).
    """
    radius = kernel_size // 2
    offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    taps = jnp.exp(-(offsets**2) / (2.0 * sigma**2))
    taps = taps / jnp.sum(taps)
    height, width = image.shape[0], image.shape[1]
    mode = "constant" if padding == "zeros" else "reflect"
    padded = jnp.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode=mode)
    rows = sum(taps[i] * padded[i : i + height] for i in range(kernel_size))
    return sum(taps[i] * rows[:, i : i + width] for i in range(kernel_size))


def per_image(fn: Callable[[jax.Array, jax.Array], jax.Array]) -> AugmentFn:
    """Turns ``fn(key, image[H, W, C]) -> image`` into a batch view with one key per image.

    The result has the view signature ``(key, images[N, H, W, C]) -> [N, ...]``; use it
    to write your own ``augment_fn`` from per-image code.
    """

    def batch_fn(key: jax.Array, images: jax.Array) -> jax.Array:
        keys = jax.random.split(key, images.shape[0])
        return jax.vmap(fn)(keys, images)

    return batch_fn
