"""The shared image ops: one crop-box sampler and one resize, equal in numpy, jax and TF."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol_jax import image_ops

AREA, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
# Measured on [0, 1] floats: numpy and TensorFlow differ by at most 4.8e-7, either and the
# jitted jax resize by at most 6.1e-6 (XLA fuses and reorders the float32 weight arithmetic).
RESIZE_ATOL = 1e-5
# Measured: numpy's, XLA's and TensorFlow's float32 exp differ in the last bit for about a
# third of their inputs, so boxes from the same uniforms differ by up to 9e-8 of the side
# (4.6e-5 px at 500 px); the try that fits is the same.
BOX_RTOL = 3e-7

device_resize = jax.jit(image_ops.crop_and_resize, static_argnums=(2, 3))


def _tf():
    import tensorflow as tf

    return tf


def test_normalize_uint8_and_unit_float():
    images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    expected = (images / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(image_ops.normalize(images), expected, atol=1e-5)
    np.testing.assert_allclose(image_ops.normalize(images / np.float32(255)), expected, atol=1e-5)
    assert image_ops.normalize(images).dtype == jnp.float32
    with pytest.raises(TypeError, match="uint8"):
        image_ops.normalize(images.astype(np.int32))


@pytest.mark.parametrize("height, width", [(375, 500), (16, 24), (10, 200)])
def test_sampler_gives_the_same_boxes_in_numpy_jax_and_tensorflow(height, width):
    """(10, 200): no box of ratio <= 4/3 fits, every draw falls back to the whole image."""
    tf = _tf()
    u = np.random.default_rng(0).random((300, 4, image_ops.CROP_TRIES), dtype=np.float32)
    sample = functools.partial(
        image_ops.sample_crop_box, area_range=AREA, ratio_range=RATIO
    )  # fmt: skip
    boxes = np.stack([sample(x, height, width) for x in u])
    on_jax = jax.jit(jax.vmap(lambda x: sample(x, height, width, xp=jnp)))(u)
    on_tf = tf.function(
        lambda x: sample(x, tf.shape(x)[0] * 0 + height, width, xp=tf.experimental.numpy)
    )
    on_tf = np.stack([on_tf(tf.constant(x)).numpy() for x in u])
    for other in (np.asarray(on_jax), on_tf):
        assert other.dtype == np.float32
        np.testing.assert_allclose(other, boxes, rtol=0, atol=BOX_RTOL * max(height, width))
    top, left, crop_h, crop_w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + crop_h <= height * (1 + 1e-6)).all() and (
        left + crop_w <= width * (1 + 1e-6)
    ).all()
    if (height, width) == (10, 200):  # centred, whole height, width 10 * 4/3
        np.testing.assert_allclose(boxes[0], [0, (200 - 40 / 3) / 2, 10, 40 / 3], rtol=1e-6)
        return
    area, ratio = crop_h * crop_w / (height * width), crop_w / crop_h
    assert area.min() >= 0.08 - 1e-6 and area.max() <= 1 + 1e-6
    assert ratio.min() >= 3 / 4 - 1e-6 and ratio.max() <= 4 / 3 + 1e-6
    # U(0.08, 1) areas, less those that do not fit (large ones, as wide or tall boxes).
    assert 0.3 < area.mean() < 0.54 and area.std() > 0.15


def test_centre_box_in_each_namespace():
    tnp = _tf().experimental.numpy
    for xp in (np, jnp, tnp):
        np.testing.assert_array_equal(image_ops.centre_box(375, 500, 0.875, xp), [23, 86, 328, 328])
        np.testing.assert_array_equal(image_ops.centre_box(32, 32, 1.0, xp), [0, 0, 32, 32])
        np.testing.assert_array_equal(image_ops.centre_box(3, 1, 0.1, xp), [1, 0, 1, 1])


def _tf_resize(image, box, size, method):
    """TensorFlow's ScaleAndTranslate with the coordinates image_ops uses, float in [0, 1]."""
    tf = _tf()
    scale = np.float32(size) / np.asarray(box[2:], np.float32)
    translation = -np.asarray(box[:2], np.float32) * scale
    kernel = {"bicubic": "keyscubic", "bilinear": "triangle"}[method]
    out = tf.raw_ops.ScaleAndTranslate(
        images=image[None], size=[size, size], scale=scale, translation=translation,
        kernel_type=kernel, antialias=True,
    )  # fmt: skip
    return np.clip(out[0].numpy(), 0, 1)


@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size", [12, 64])  # boxes of 4-37 px: shrunk at 12, grown at 64
def test_numpy_jax_and_tensorflow_resize_agree(method, size):
    rng = np.random.default_rng(1)
    image = rng.random((37, 29, 3), dtype=np.float32)
    for u in rng.random((12, 4, image_ops.CROP_TRIES), dtype=np.float32):
        box = image_ops.sample_crop_box(u, 37, 29, (0.02, 1.0), (0.5, 2.0))
        host = image_ops.crop_and_resize_np(image, box, size, method)
        device = np.asarray(device_resize(image, box, size, method))
        assert host.shape == device.shape == (size, size, 3) and host.dtype == np.float32
        np.testing.assert_allclose(host, device, atol=RESIZE_ATOL)
        np.testing.assert_allclose(_tf_resize(image, box, size, method), device, atol=RESIZE_ATOL)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_crop_and_resize_samples_the_box(method):
    image = np.random.default_rng(0).random((8, 8, 3), dtype=np.float32)
    quadrant = np.array([4.0, 0.0, 4.0, 4.0], np.float32)
    np.testing.assert_allclose(device_resize(image, quadrant, 4, method), image[4:, :4], atol=1e-6)
    np.testing.assert_allclose(
        image_ops.crop_and_resize_np(image, quadrant, 4, method), image[4:, :4], atol=1e-6
    )
    whole = device_resize(image, np.array([0.0, 0.0, 8.0, 8.0], np.float32), 4, method)
    resized = jax.image.resize(image, (4, 4, 3), method, antialias=True)
    np.testing.assert_allclose(whole, np.clip(resized, 0, 1), atol=1e-6)


def test_numpy_resize_of_uint8_and_a_box_in_a_large_image():
    """uint8 input is read as [0, 1]; only the box's neighbourhood is read, to the same result."""
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (300, 200, 1), dtype=np.uint8)
    box = (100.3, 50.7, 9.5, 12.25)
    out = image_ops.crop_and_resize_np(image, box, 7)
    np.testing.assert_allclose(
        out, device_resize(image / np.float32(255), box, 7, "bicubic"), atol=RESIZE_ATOL
    )
    np.testing.assert_array_equal(image_ops.to_uint8(image / np.float32(255)), image)
