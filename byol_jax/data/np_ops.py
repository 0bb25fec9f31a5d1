"""Host image ops in NumPy for the in-memory sources: image_ops' sampler and resize, per image.

`byol_jax.data.tf_ops` is the same in TensorFlow, for the sources that decode files.
"""

from __future__ import annotations

import numpy as np

from byol_jax import image_ops
from byol_jax.data import config, ordering
from byol_jax.data.source import PLAIN, VIEWS


def rgb(images: np.ndarray) -> np.ndarray:
    """[..., 1 or 3] -> [..., 3]: grayscale repeated to three channels."""
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def centre_crop(image: np.ndarray, size: int, fraction: float, method: str) -> np.ndarray:
    """uint8 [H, W, C] -> [size, size, C]: as it is when already that size, else the centre
    square of `fraction` of the short side, resized."""
    height, width = image.shape[:2]
    if height == width == size:
        return image
    box = image_ops.centre_box(height, width, fraction)
    return image_ops.to_uint8(image_ops.crop_and_resize_np(image, box, size, method))


def random_crop(image: np.ndarray, rng: np.random.Generator, size: int, data) -> np.ndarray:
    """A random-resized crop (data.crop_area, data.crop_ratio) of uint8 [H, W, C] to S x S."""
    u = rng.random((4, image_ops.CROP_TRIES), dtype=np.float32)
    box = image_ops.sample_crop_box(
        u, image.shape[0], image.shape[1], tuple(data.crop_area), tuple(data.crop_ratio)
    )
    resized = image_ops.crop_and_resize_np(image, box, size, config.resize_method(data))
    return image_ops.to_uint8(resized)


def train_image(image: np.ndarray, mode: str, size: int, data, seed: int, position: int):
    """One example's training input for `mode`: uint8 [S, S, C], or [2, S, S, C] for views.
    Its randomness is keyed by (seed, position, view), the ordering contract."""
    if mode == PLAIN:
        return centre_crop(image, size, 1.0, config.resize_method(data))
    crop = lambda view: random_crop(image, ordering.example_rng(seed, position, view), size, data)
    if mode == VIEWS:
        return np.stack([crop(0), crop(1)])
    flip = ordering.example_rng(seed, position, 2).random() < data.flip_p
    return crop(0)[:, ::-1] if flip else crop(0)
