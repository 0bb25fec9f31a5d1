"""TensorFlow's side of the host pipeline: its import, decoding, and the host crops.

The only modules that import TensorFlow / TFDS are this one's callers (folder, tfds). They
import it on first use, with GPUs hidden from it, so `import byol_jax.data` stays free of it.
Crops use image_ops' box sampler (through tensorflow.experimental.numpy) and TensorFlow's
ScaleAndTranslate, the same kernels and coordinates as `image_ops.crop_and_resize`.
"""

from __future__ import annotations

import functools
import logging

from byol_jax import image_ops
from byol_jax.data import config
from byol_jax.data.source import PLAIN, VIEWS

_KERNEL_TYPES = {"bicubic": "keyscubic", "bilinear": "triangle"}  # image_ops.RESIZE_METHODS
_KERNEL_RADIUS = 2  # Keys cubic's support; the triangle's (1) is inside it


@functools.cache
def tf():
    """TensorFlow, imported on first use, with GPUs hidden: the accelerators belong to JAX."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow's devices were already initialised by someone else
        logging.warning("byol_jax.data: could not hide GPUs from TensorFlow")
    return tf


@functools.cache
def tfds():
    tf()
    import tensorflow_datasets as tfds

    return tfds


def decode(encoded):
    """Encoded JPEG / PNG / BMP / GIF bytes -> uint8 [H, W, 3]."""
    image = tf().io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def crop_and_resize(image, box, size: int, method: str, origin=(0, 0)):
    """`image_ops.crop_and_resize` in TensorFlow: uint8 [h, w, 3] -> uint8 [S, S, 3].

    `box` (top, left, height, width) is in the pixels of the full image, of which `image`
    may be a window whose top-left pixel is `origin` (y, x).
    """
    t = tf()
    box = t.cast(box, t.float32)
    scale = size / box[2:]
    translation = -(box[:2] - t.cast(origin, t.float32)) * scale
    out = t.raw_ops.ScaleAndTranslate(
        images=t.cast(image, t.float32)[None] / 255,
        size=t.constant([size, size]),
        scale=scale,
        translation=translation,
        kernel_type=_KERNEL_TYPES[method],
        antialias=True,
    )[0]
    return t.cast(t.clip_by_value(t.round(out * 255), 0, 255), t.uint8)


def window(boxes, height, width, size: int):
    """int32 [4] (top, left, height, width): the whole pixels the resampling of every box
    reads. Each box grows by the kernel's support, 2 * max(side / size, 1) pixels (wider when
    shrinking), plus one for rounding, clipped to the image."""
    t = tf()
    boxes = t.stack(boxes)  # [V, 4]
    margin = _KERNEL_RADIUS * t.maximum(boxes[:, 2:] / size, 1.0) + 1
    low = t.maximum(t.reduce_min(t.floor(boxes[:, :2] - margin), 0), 0.0)
    limit = t.cast(t.stack([height, width]), t.float32)
    high = t.minimum(t.reduce_max(t.math.ceil(boxes[:, :2] + boxes[:, 2:] + margin), 0), limit)
    return t.cast(t.concat([low, high - low], 0), t.int32)


def crops(encoded, boxes_of, size: int, method: str):
    """uint8 [V, S, S, 3]: the crops `boxes_of(height, width)` (a list of V boxes) of one
    encoded image. A JPEG decodes only the window they read, which gives the pixels that
    decoding it whole would (tests/test_data.py checks it); other formats decode whole."""
    t = tf()

    def from_jpeg():
        shape = t.io.extract_jpeg_shape(encoded)
        boxes = boxes_of(shape[0], shape[1])
        crop_window = window(boxes, shape[0], shape[1], size)
        pixels = t.io.decode_and_crop_jpeg(encoded, crop_window, channels=3)
        origin = crop_window[:2]
        return t.stack([crop_and_resize(pixels, b, size, method, origin) for b in boxes])

    def from_image():
        image = decode(encoded)
        boxes = boxes_of(t.shape(image)[0], t.shape(image)[1])
        return t.stack([crop_and_resize(image, b, size, method) for b in boxes])

    return t.cond(t.io.is_jpeg(encoded), from_jpeg, from_image)


def eval_box(height, width, size: int, fraction: float):
    """The whole image when it is already size x size, else its centre square of `fraction`."""
    t, tnp = tf(), tf().experimental.numpy
    whole = t.cast(t.stack([0, 0, height, width]), t.float32)
    centre = image_ops.centre_box(height, width, fraction, xp=tnp)
    return t.where((height == size) & (width == size), whole, centre)


def eval_image(encoded, size: int, fraction: float, method: str):
    """uint8 [S, S, 3]: the eval input of one encoded image (`eval_box`, resized)."""
    return crops(encoded, lambda h, w: [eval_box(h, w, size, fraction)], size, method)[0]


def random_box(key, height, width, data):
    """A random-resized crop box (image_ops.sample_crop_box) from a stateless key int64 [2]."""
    t = tf()
    u = t.random.stateless_uniform([4, image_ops.CROP_TRIES], key)
    area, ratio = tuple(data.crop_area), tuple(data.crop_ratio)
    return image_ops.sample_crop_box(u, height, width, area, ratio, xp=t.experimental.numpy)


def train_image(encoded, key, mode: str, size: int, data):
    """One example's training input for `mode` from its encoded bytes and key int64 [2]:
    uint8 [S, S, 3], or [2, S, S, 3] for views. Views are folds 0 and 1 of the key, the
    flip fold 2, as the NumPy path keys (seed, position, view)."""
    t, method = tf(), config.resize_method(data)
    if mode == PLAIN:
        return eval_image(encoded, size, 1.0, method)
    views = 2 if mode == VIEWS else 1
    boxes_of = lambda h, w: [random_box(t.random.fold_in(key, v), h, w, data) for v in range(views)]
    images = crops(encoded, boxes_of, size, method)
    if mode == VIEWS:
        return images
    flip = t.random.stateless_uniform([], t.random.fold_in(key, 2)) < data.flip_p
    return t.cond(flip, lambda: t.reverse(images[0], [1]), lambda: images[0])
