"""Source 'digits': scikit-learn's bundled 8x8 digits (1797 images, 10 classes), no download.

'train' / 'test' are a stratified 80/20 split with a fixed seed, each in the dataset's order.
Images are upsampled to `image_size` by image_ops' NumPy resize (bilinear) and served as the
'arrays' source serves its arrays.
"""

from __future__ import annotations

import functools

import numpy as np

from byol_jax import image_ops
from byol_jax.data.arrays import ArraysSource, Examples

_TEST_FRACTION = 0.2
_SPLIT_SEED = 0


class DigitsSource(ArraysSource):
    def describe(self) -> str:
        return "the digits dataset"

    def splits(self, image_size: int | None) -> dict[str, Examples]:
        return {name: Examples(**split) for name, split in digits_splits(image_size).items()}

    def info(self) -> dict:
        return {**super().info(), "image_shape": (8, 8, 1)}  # as stored


@functools.lru_cache(maxsize=4)
def digits_splits(image_size: int | None) -> dict[str, dict[str, np.ndarray]]:
    """{'train' | 'test': {'images': uint8 [N, S, S, 3], 'labels': int32 [N]}}.

    The 0..16 values map to 0..255; `image_size=None` keeps the stored 8x8 single channel.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    pixels, labels = load_digits(return_X_y=True)
    values = pixels.reshape(-1, 8, 8, 1).astype(np.float32) / 16
    if image_size is not None:
        whole = (0.0, 0.0, 8.0, 8.0)
        values = np.stack(
            [image_ops.crop_and_resize_np(v, whole, image_size, "bilinear") for v in values]
        )
        values = np.repeat(values, 3, axis=-1)
    images = image_ops.to_uint8(values)
    train, test = train_test_split(
        np.arange(len(labels)), test_size=_TEST_FRACTION, stratify=labels, random_state=_SPLIT_SEED
    )
    return {
        name: {"images": images[np.sort(rows)], "labels": labels[np.sort(rows)].astype(np.int32)}
        for name, rows in (("train", train), ("test", test))
    }
