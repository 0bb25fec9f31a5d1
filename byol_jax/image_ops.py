"""The image operations host and device share: the crop-box sampler, one resize, normalisation.

One definition of each, so a crop made on the host (numpy or TensorFlow, in `byol_jax.data`)
and a crop made on the device (`byol_jax.augment`) of the same box are the same image:

* `sample_crop_box` is written once over an array namespace `xp` (numpy, jax.numpy or
  tensorflow.experimental.numpy): torchvision's RandomResizedCrop box with continuous sides.
* The resize of a box to S x S is `jax.image.scale_and_translate` with an antialiased Keys
  cubic (a = -0.5) or triangle kernel. `crop_and_resize` is that call (device);
  `crop_and_resize_np` computes the same two weight matrices in NumPy (host);
  `byol_jax.data.tf_ops.crop_and_resize` is TensorFlow's ScaleAndTranslate, the same kernels.
* `normalize`: uint8 or [0, 1] images to ImageNet-normalised float32.

No TensorFlow here: numpy and jax only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# Mean / std of ImageNet in [0, 1] units.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's RandomResizedCrop tries 10 boxes before falling back to the whole image.
CROP_TRIES = 10
# Resize method -> jax.image method; `byol_jax.data.tf_ops` maps them to TF's kernel names.
RESIZE_METHODS = {"bicubic": "cubic", "bilinear": "linear"}


def normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
    """uint8 [0, 255] or float [0, 1] images [..., C] -> float32 (x - mean) / std."""
    x = to_unit_float(images)
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def to_unit_float(images) -> jax.Array:
    """uint8 [0, 255] -> float32 [0, 1]; float images are cast to float32 as they are."""
    images = jnp.asarray(images)
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    if jnp.issubdtype(images.dtype, jnp.floating):
        return images.astype(jnp.float32)
    raise TypeError(f"images must be uint8 (0-255) or float in [0, 1], got dtype {images.dtype}.")


# ----------------------------------------------------------------------------- crop boxes


def sample_crop_box(
    u,
    height,
    width,
    area_range: tuple[float, float] = (0.08, 1.0),
    ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
    xp=np,
):
    """torchvision's RandomResizedCrop box, drawn from uniforms, in any array namespace.

    Try t has area `u[0, t]` of the way through `area_range` (times the image area) and
    width / height `exp(u[1, t])` of the way through log `ratio_range`; the first try that
    fits in the image wins, placed at `u[2, t]`, `u[3, t]` of the free space (top, left).
    When none fits: the whole image with its ratio clamped into the range, centred. Boxes
    are continuous (sub-pixel), where torchvision rounds to whole pixels.

    Args:
      u: float32 [4, tries] uniforms in [0, 1).
      height, width: the image's size (ints, or scalars of `xp`).
      xp: numpy, jax.numpy or tensorflow.experimental.numpy.

    Returns:
      float32 [4]: (top, left, height, width) in image pixels.
    """
    h, w = xp.asarray(height, dtype=xp.float32), xp.asarray(width, dtype=xp.float32)
    area = h * w * (area_range[0] + (area_range[1] - area_range[0]) * u[0])
    log_lo, log_hi = math.log(ratio_range[0]), math.log(ratio_range[1])
    ratio = xp.exp(log_lo + (log_hi - log_lo) * u[1])
    crop_h, crop_w = xp.sqrt(area / ratio), xp.sqrt(area * ratio)
    fits = (crop_h <= h) & (crop_w <= w)
    first, any_fits = xp.argmax(fits), xp.any(fits)
    # torchvision's fallback: the whole image, its ratio clamped into the range.
    in_ratio = w / h
    whole_h = xp.where(in_ratio < ratio_range[0], w / ratio_range[0], h)
    whole_w = xp.where(in_ratio > ratio_range[1], h * ratio_range[1], w)
    crop_h = xp.where(any_fits, crop_h[first], whole_h)
    crop_w = xp.where(any_fits, crop_w[first], whole_w)
    u_top = xp.where(any_fits, u[2][first], 0.5)  # the fallback is centred
    u_left = xp.where(any_fits, u[3][first], 0.5)
    box = [u_top * (h - crop_h), u_left * (w - crop_w), crop_h, crop_w]
    return xp.stack([xp.asarray(v, dtype=xp.float32) for v in box])


def centre_box(height, width, fraction: float = 1.0, xp=np):
    """The centre square of `fraction` of the short side, in whole pixels (the paper's
    224 / 256 eval crop): float32 [4] (top, left, side, side).

    The side is rounded half up (floor(x + 0.5): tensorflow.experimental.numpy has no round
    for plain tensors), the offsets down.
    """
    h, w = xp.asarray(height, dtype=xp.float32), xp.asarray(width, dtype=xp.float32)
    side = xp.maximum(xp.floor(fraction * xp.minimum(h, w) + 0.5), 1.0)
    return xp.stack([xp.floor((h - side) / 2), xp.floor((w - side) / 2), side, side])


# ----------------------------------------------------------------------------- resize


def crop_and_resize(image, box, size: int, method: str = "bicubic") -> jax.Array:
    """Resamples `box` of `image` to [size, size, C], clipped to [0, 1] (device; jit/vmap).

    One `jax.image.scale_and_translate` call: separable, antialiased when shrinking, no
    dynamic shapes. Output pixel o samples input coordinate (o + 0.5) * box_side / size +
    box_origin.

    Args:
      image: [H, W, C] float in [0, 1] (or uint8).
      box: [4] (top, left, height, width) in input pixels.
      size: static output side.
      method: 'bicubic' or 'bilinear'.
    """
    image = to_unit_float(image)
    top, left, crop_h, crop_w = box[0], box[1], box[2], box[3]
    scale = jnp.stack([size / crop_h, size / crop_w]).astype(jnp.float32)
    translation = -jnp.stack([top, left]).astype(jnp.float32) * scale
    out = jax.image.scale_and_translate(
        image,
        (size, size, image.shape[-1]),
        (0, 1),
        scale,
        translation,
        method=RESIZE_METHODS[method],
        antialias=True,
    )
    return jnp.clip(out, 0.0, 1.0)


# The host's resize is written out in NumPy rather than calling jax.image on the host: the
# numpy sources must not import TensorFlow, and jax work there would land on the accelerator
# the training step owns (and compile once per box shape). These are jax's own formulas
# (jax._src.image.scale.compute_weight_mat, antialias=True), in float32 as jax computes them.


def crop_and_resize_np(image: np.ndarray, box, size: int, method: str = "bicubic") -> np.ndarray:
    """`crop_and_resize` in NumPy (host): [H, W, C] uint8 or [0, 1] float -> float32
    [size, size, C] in [0, 1]. Only the rows and columns the kernels reach are read."""
    top, left, crop_h, crop_w = (float(v) for v in box)
    rows = _weight_matrix(image.shape[0], size, top, crop_h, method)  # [H, S]
    cols = _weight_matrix(image.shape[1], size, left, crop_w, method)  # [W, S]
    (y0, y1), (x0, x1) = _support(rows), _support(cols)
    pixels = np.asarray(image[y0:y1, x0:x1], np.float32)
    if image.dtype == np.uint8:
        pixels = pixels / np.float32(255)
    h, w, channels = pixels.shape
    resampled_rows = (rows[y0:y1].T @ pixels.reshape(h, w * channels)).reshape(size, w, channels)
    out = np.matmul(cols[x0:x1].T, resampled_rows)  # [S, W'] @ [S, W', C] -> [S, S, C]
    return np.clip(out, 0.0, 1.0)


def _weight_matrix(in_size: int, size: int, start: float, length: float, method: str):
    """float32 [in_size, size]: input pixel i's weight in output pixel o along one axis."""
    scale = np.float32(size) / np.float32(length)
    translation = -np.float32(start) * scale
    inv_scale = np.float32(1) / scale
    kernel_scale = max(inv_scale, np.float32(1))  # widen the kernel when shrinking
    outputs = np.arange(size, dtype=np.float32)
    sample = (outputs + np.float32(0.5)) * inv_scale - translation * inv_scale - np.float32(0.5)
    distance = np.abs(sample[None, :] - np.arange(in_size, dtype=np.float32)[:, None])
    weights = _KERNELS[method](distance / kernel_scale)
    total = weights.sum(axis=0, keepdims=True)  # normalised over the pixels in the image
    tiny = np.abs(total) <= 1000 * np.finfo(np.float32).eps
    weights = np.where(tiny, np.float32(0), weights / np.where(total != 0, total, 1))
    inside = (sample >= -0.5) & (sample <= in_size - 0.5)  # no weight off the image
    return np.where(inside[None, :], weights, np.float32(0)).astype(np.float32)


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    out = ((1.5 * x - 2.5) * x) * x + 1.0
    out = np.where(x >= 1.0, ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0, out)
    return np.where(x >= 2.0, np.float32(0), out).astype(np.float32)


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(np.float32(0), 1 - np.abs(x)).astype(np.float32)


_KERNELS = {"bicubic": _keys_cubic, "bilinear": _triangle}


def _support(weights: np.ndarray) -> tuple[int, int]:
    """[start, stop) of the input pixels with a weight anywhere (all of them when none)."""
    used = np.flatnonzero(weights.any(axis=1))
    return (int(used[0]), int(used[-1]) + 1) if used.size else (0, len(weights))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8 [0, 255], rounded (the host's output type)."""
    return np.clip(np.round(np.asarray(images) * 255), 0, 255).astype(np.uint8)
