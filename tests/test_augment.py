"""On-device augmentations: per-image draws, probabilities, crops, colour, errors."""

import math

import chex
import dm_pix as pix
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from byol_jax import augment

# Compiled once per static config / shape and shared by the tests below.
sample = jax.jit(augment.sample_view_params, static_argnums=(0, 2))
color_jitter = jax.jit(augment.color_jitter, static_argnames="style")
byol_view1_16px = jax.jit(augment.recipe("byol", 16)[0])

OPS_OFF = dict(flip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)


def _images(n, height, width, channels=3, seed=0, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        return rng.integers(0, 256, (n, height, width, channels), dtype=np.uint8)
    return rng.uniform(0.0, 1.0, (n, height, width, channels)).astype(dtype)


def _isolated(op, p=0.5):
    """An 8 px, uncropped, unnormalised view where only ``op`` can fire (with p)."""
    fields = dict(OPS_OFF, image_size=8, crop=False, normalize=False)
    fields.update(blur_kernel_size=3, blur_sigma=(1.0, 2.0))
    fields[f"{op}_p"] = p
    return augment.ViewConfig(**fields)


# ----------------------------------------------------------------------------- randomness


def test_same_key_same_output_and_independent_draws_per_image():
    copies = np.repeat(_images(1, 16, 16), 4, axis=0)
    out = np.asarray(byol_view1_16px(jax.random.key(0), copies))
    np.testing.assert_array_equal(out, np.asarray(byol_view1_16px(jax.random.key(0), copies)))
    assert not np.allclose(out, np.asarray(byol_view1_16px(jax.random.key(1), copies)))
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(out[i] - out[j]).max() > 0.1, (i, j)


def test_uint8_and_unit_float_inputs_give_the_same_views():
    images = _images(4, 16, 16)
    from_uint8 = byol_view1_16px(jax.random.key(3), images)
    from_float = byol_view1_16px(jax.random.key(3), images.astype(np.float32) / 255.0)
    np.testing.assert_allclose(from_uint8, from_float, atol=1e-5)


@pytest.mark.parametrize("name", ["byol", "seed"])
def test_each_probability_is_what_it_says(name):
    n = 5000
    for config in augment.recipe_configs(name, 8):
        draws = sample(config, jax.random.key(7), (n, 8, 8, 3))
        for op in augment.DECISIONS:
            p = getattr(config, f"{op}_p")
            fraction = float(np.mean(draws[op]))
            if p in (0.0, 1.0):  # e.g. byol view 1: always blurs, never solarizes
                assert fraction == p, (op, fraction)
            else:
                assert abs(fraction - p) < 4 * math.sqrt(p * (1 - p) / n), (op, p, fraction)


@pytest.mark.parametrize("op", augment.DECISIONS)
def test_drawn_decisions_are_the_ops_that_fired(op):
    """The decisions returned by sample_view_params are exactly the images an op changed."""
    view = augment.make_view(_isolated(op))
    rng = np.random.default_rng(1)
    # Values in [0.55, 0.7]: solarize, jitter and blur change every image they touch.
    images = rng.uniform(0.55, 0.7, (256, 8, 8, 3)).astype(np.float32)
    key = jax.random.key(11)
    draws, out = jax.jit(lambda k, x: (view.sample(k, x.shape), view(k, x)))(key, images)
    fired, out = np.asarray(draws[op]), np.asarray(out)
    if op == "flip":
        observed = np.all(np.isclose(out, images[:, :, ::-1]), axis=(1, 2, 3))
    elif op == "grayscale":
        observed = np.all(np.ptp(out, axis=-1) < 1e-6, axis=(1, 2))
    else:
        observed = ~np.all(np.isclose(out, images, atol=1e-6), axis=(1, 2, 3))
    np.testing.assert_array_equal(observed, fired)
    assert 0.35 < fired.mean() < 0.65


def test_random_order_of_colour_ops_is_a_permutation_per_image():
    # The byol view 1 at 8 px and this shape: the compiled draws of the test above.
    draws = sample(augment.ViewConfig(image_size=8), jax.random.key(0), (5000, 8, 8, 3))
    order = np.asarray(draws["jitter_order"])
    np.testing.assert_array_equal(np.sort(order, axis=1), np.tile(np.arange(4), (5000, 1)))
    assert len({tuple(o) for o in order}) == 24  # all 4! orders occur
    fixed = augment.ViewConfig(color_jitter_random_order=False)
    fixed_order = sample(fixed, jax.random.key(0), (5, 8, 8, 3))
    np.testing.assert_array_equal(fixed_order["jitter_order"], np.tile(np.arange(4), (5, 1)))


def test_per_image_gives_each_image_its_own_key():
    add_noise = augment.per_image(lambda key, image: image + jax.random.uniform(key))
    out = np.asarray(add_noise(jax.random.key(0), jnp.zeros((6, 2, 2, 3))))
    assert len(np.unique(out[:, 0, 0, 0])) == 6


# ----------------------------------------------------------------------------- crops


def test_crop_boxes_stay_within_area_and_ratio_ranges():
    height, width, n = 16, 24, 4000
    config = augment.ViewConfig(image_size=12)
    box = np.asarray(sample(config, jax.random.key(5), (n, height, width, 3))["crop_box"])
    top, left, crop_h, crop_w = box.T
    area, ratio = crop_h * crop_w / (height * width), crop_w / crop_h
    eps = 1e-5
    assert np.all((area >= 0.08 - eps) & (area <= 1.0 + eps))
    assert np.all((ratio >= 3 / 4 - eps) & (ratio <= 4 / 3 + eps))
    assert np.all((top >= 0) & (left >= 0))
    assert np.all((top + crop_h <= height + eps) & (left + crop_w <= width + eps))
    # The sampler covers its ranges (a sampler stuck on one box would fail here).
    assert area.min() < 0.1 and area.max() > 0.85
    assert ratio.min() < 0.77 and ratio.max() > 1.3
    # Same distribution as torchvision's loop, simulated independently in numpy.
    ref_area, ref_ratio = _torchvision_crop_numpy(height, width, 200_000)
    for ours, ref in ((area, ref_area), (ratio < 1, ref_ratio < 1), (ratio, ref_ratio)):
        assert abs(ours.mean() - ref.mean()) < 4 * ref.std() / math.sqrt(n)


def _torchvision_crop_numpy(height, width, n, tries=10, seed=0):
    """RandomResizedCrop's box sampling (continuous sizes): -> area fraction, ratio [n]."""
    rng = np.random.default_rng(seed)
    area = rng.uniform(0.08, 1.0, (n, tries)) * height * width
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), (n, tries)))
    crop_h, crop_w = np.sqrt(area / ratio), np.sqrt(area * ratio)
    fits = (crop_h <= height) & (crop_w <= width)
    first = np.argmax(fits, axis=1)
    pick = lambda a: a[np.arange(n), first]
    area, ratio = pick(area) / (height * width), pick(crop_w) / pick(crop_h)
    # No try fits: the whole height, width clamped to the largest ratio (wide input).
    assert width / height > 4 / 3
    missed = ~fits.any(axis=1)
    area[missed], ratio[missed] = height * height * 4 / 3 / (height * width), 4 / 3
    return area, ratio


def test_crop_falls_back_to_a_centre_crop_when_no_box_fits():
    # No 8x8 box has a width / height ratio of 10..20: torchvision keeps the whole width
    # with the ratio clamped to 10, centred vertically.
    box = augment.random_resized_crop_box(jax.random.key(0), 8, 8, (0.5, 1.0), (10.0, 20.0))
    np.testing.assert_allclose(box, [(8 - 0.8) / 2, 0.0, 0.8, 8.0], rtol=1e-6)


def test_output_has_the_static_size_asked_for():
    # Crop first (byol) and crop last (seed), from a non-square input.
    for view in (augment.recipe("byol", 12)[0], augment.recipe("seed", 12)[0]):
        out = jax.jit(view)(jax.random.key(0), _images(3, 16, 24))
        assert out.shape == (3, 12, 12, 3) and out.dtype == jnp.float32


def test_host_crop_runs_only_the_device_ops():
    view1, _ = augment.recipe("byol", 8, crop=False, **OPS_OFF, normalize=False)
    images = _images(2, 8, 8, dtype=np.float32)
    np.testing.assert_allclose(jax.jit(view1)(jax.random.key(0), images), images, atol=1e-7)
    assert "crop_box" not in sample(view1.config, jax.random.key(0), images.shape)


# ----------------------------------------------------------------------------- colour


def _byol_jitter_numpy(image, order, brightness, contrast):
    """Brightness (additive) and contrast (per-channel mean), clipped after each."""
    for op in order:
        if op == 0:
            image = np.clip(image + brightness, 0, 1)
        elif op == 1:
            mean = image.mean(axis=(0, 1), keepdims=True)
            image = np.clip(contrast * (image - mean) + mean, 0, 1)
    return image


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (1, 3, 0, 2)])
def test_byol_colour_jitter_matches_an_independent_computation(order):
    image = _images(1, 8, 8, dtype=np.float32)[0]
    out = color_jitter(
        jnp.asarray(image),
        jnp.array(order),
        brightness=0.3,
        contrast=1.6,
        saturation=1.0,
        hue=0.0,
    )
    np.testing.assert_allclose(out, _byol_jitter_numpy(image, order, 0.3, 1.6), atol=1e-5)


def test_torchvision_colour_jitter_matches_an_independent_computation():
    image = _images(1, 8, 8, dtype=np.float32)[0]
    gray = lambda x: (x @ np.array([0.2989, 0.587, 0.114], np.float32))[..., None]
    expected = np.clip(image * 1.3, 0, 1)  # brightness factor
    expected = np.clip(0.6 * expected + 0.4 * gray(expected).mean(), 0, 1)  # contrast
    expected = np.clip(1.5 * expected - 0.5 * gray(expected), 0, 1)  # saturation
    out = color_jitter(
        jnp.asarray(image),
        jnp.arange(4),
        brightness=1.3,
        contrast=0.6,
        saturation=1.5,
        hue=0.0,
        style="torchvision",
    )
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("style", ["byol", "torchvision"])
def test_colour_ops_keep_values_in_unit_range(style):
    image = jnp.asarray(_images(1, 8, 8, dtype=np.float32)[0])
    for order in ([0, 1, 2, 3], [3, 2, 1, 0]):
        for amounts in ((0.9, 1.9, 1.9, 0.5), (-0.9, 0.0, 0.0, -0.5)):
            out = np.asarray(color_jitter(image, jnp.array(order), *amounts, style=style))
            assert out.min() >= 0.0 and out.max() <= 1.0
            assert not np.allclose(out, image)
    strong = dict(brightness=0.9, contrast=0.9, saturation=0.9, hue=0.5, color_jitter_p=1.0)
    view = augment.make_view(
        augment.ViewConfig(image_size=8, color_jitter_style=style, normalize=False, **strong)
    )
    out = np.asarray(jax.jit(view)(jax.random.key(0), _images(64, 8, 8)))
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_normalisation_uses_imagenet_mean_and_std():
    view = augment.make_view(augment.ViewConfig(image_size=8, crop=False, **OPS_OFF))
    images = _images(2, 8, 8)
    expected = (images / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(jax.jit(view)(jax.random.key(0), images), expected, atol=1e-5)


def test_gaussian_blur_agrees_with_dm_pix():
    image = jnp.asarray(_images(1, 12, 12, dtype=np.float32)[0])
    for sigma in (0.3, 1.7):
        ours = augment.gaussian_blur(image, sigma, 5, padding="zeros")
        np.testing.assert_allclose(ours, pix.gaussian_blur(image, sigma, 5), atol=1e-6)
        reflected = jnp.pad(image, ((2, 2), (2, 2), (0, 0)), mode="reflect")
        np.testing.assert_allclose(
            augment.gaussian_blur(image, sigma, 5, padding="reflect"),
            pix.gaussian_blur(reflected, sigma, 5, padding="VALID"),
            atol=1e-6,
        )


def test_gaussian_blur_padding():
    constant = jnp.full((8, 8, 3), 0.5)
    reflected = augment.gaussian_blur(constant, 1.5, 3, padding="reflect")
    np.testing.assert_allclose(reflected, constant, atol=1e-6)
    zero_padded = np.asarray(augment.gaussian_blur(constant, 1.5, 3, padding="zeros"))
    assert zero_padded[0, 0, 0] < 0.45 and abs(zero_padded[4, 4, 0] - 0.5) < 1e-6


def test_blur_kernel_is_about_a_tenth_of_the_side():
    config = augment.ViewConfig()
    sizes = {side: augment.blur_kernel_size(config, side) for side in (8, 32, 96, 224)}
    assert sizes == {8: 1, 32: 3, 96: 9, 224: 23}
    assert augment.blur_kernel_size(augment.ViewConfig(blur_kernel_size=5), 224) == 5


# ----------------------------------------------------------------------------- tracing


def test_pipeline_traces_once_for_a_fixed_shape():
    view1, view2 = augment.recipe("byol", 8)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def both_views(key, images):
        key1, key2 = jax.random.split(key)
        return view1(key1, images), view2(key2, images)

    for seed in range(3):
        both_views(jax.random.key(seed), _images(4, 8, 8, seed=seed))


def test_views_run_under_pmap_with_one_key_per_device():
    devices = jax.local_device_count()
    view1, _ = augment.recipe("byol", 8)
    keys = jax.random.split(jax.random.key(0), devices)
    copies = np.repeat(_images(1, 8, 8)[None], devices, axis=0).repeat(2, axis=1)
    out = np.asarray(jax.pmap(view1)(keys, copies))
    assert out.shape == (devices, 2, 8, 8, 3)
    assert devices == 1 or not np.allclose(out[0], out[1])


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "images, error, match",
    [
        (np.zeros((8, 8, 3), np.uint8), ValueError, "batch"),
        (np.zeros((2, 8, 8, 4), np.uint8), ValueError, "3 channels"),
        (np.zeros((2, 8, 8, 1), np.uint8), ValueError, "grayscale_to_rgb"),
        (np.zeros((2, 8, 8, 3), np.int32), TypeError, "uint8"),
        (np.zeros((2, 6, 6, 3), np.uint8), ValueError, "larger than the input"),
        ([[1, 2]], TypeError, "array"),
    ],
)
def test_bad_input_is_refused_at_trace_time(images, error, match):
    view1, _ = augment.recipe("byol", 8)
    with pytest.raises(error, match=match):
        jax.jit(view1)(jax.random.key(0), images) if hasattr(images, "shape") else view1(
            jax.random.key(0), images
        )


def test_host_cropped_input_must_have_the_output_size():
    view1, _ = augment.recipe("byol", 8, crop=False)
    with pytest.raises(ValueError, match="crop=False"):
        view1(jax.random.key(0), np.zeros((2, 10, 10, 3), np.uint8))


def test_upscaling_and_oversized_blur_kernels_are_refused_unless_asked():
    view = augment.make_view(augment.ViewConfig(image_size=16, allow_upscale=True))
    assert jax.jit(view)(jax.random.key(0), _images(2, 8, 8)).shape == (2, 16, 16, 3)
    big_kernel = augment.make_view(augment.ViewConfig(image_size=8, blur_kernel_size=9))
    with pytest.raises(ValueError, match="blur_kernel_size"):
        big_kernel(jax.random.key(0), _images(2, 8, 8))


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(blur_p=1.5), "blur_p"),
        (dict(solarize_p=-0.1), "solarize_p"),
        (dict(crop_area=(0.5, 1.2)), "crop_area"),
        (dict(crop_ratio=(4 / 3, 3 / 4)), "crop_ratio"),
        (dict(brightness=-0.1), "brightness"),
        (dict(hue=0.7), "hue"),
        (dict(blur_kernel_size=4), "odd"),
        (dict(image_size=0), "image_size"),
        (dict(resize_method="nearest"), "resize_method"),
        (dict(color_jitter_style="tf"), "color_jitter_style"),
    ],
)
def test_bad_config_is_refused_at_build_time(fields, match):
    with pytest.raises(ValueError, match=match):
        augment.ViewConfig(**fields)


def test_grayscale_images_are_repeated_to_rgb_when_asked():
    view1, _ = augment.recipe("byol", 8, grayscale_to_rgb=True, normalize=False)
    out = np.asarray(jax.jit(view1)(jax.random.key(0), _images(4, 8, 8, channels=1)))
    assert out.shape == (4, 8, 8, 3)
    # Colour ops on a gray image keep it gray (hue and saturation have nothing to act on).
    assert np.ptp(out, axis=-1).max() < 1e-5


# ----------------------------------------------------------------------------- recipes


def test_byol_recipes_are_the_papers_views():
    view1, view2 = augment.recipe_configs("byol", 224)
    common = dict(
        flip_p=0.5,
        color_jitter_p=0.8,
        brightness=0.4,
        contrast=0.4,
        saturation=0.2,
        hue=0.1,
        grayscale_p=0.2,
        blur_sigma=(0.1, 2.0),
        crop_area=(0.08, 1.0),
        color_jitter_style="byol",
        color_jitter_random_order=True,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
    for name, value in common.items():
        assert getattr(view1, name) == getattr(view2, name) == value, name
    assert view1.crop_ratio == pytest.approx((3 / 4, 4 / 3))
    assert (view1.blur_p, view1.solarize_p, view2.blur_p, view2.solarize_p) == (1, 0, 0.1, 0.2)
    cifar1, cifar2 = augment.recipe_configs("byol_cifar", 32)
    assert cifar1.blur_p == cifar2.blur_p == 0 and cifar2.solarize_p == 0.2
    assert cifar1.image_size == 32


def test_seed_recipe_is_byol_pytorch_default_pipeline():
    view1, view2 = augment.recipe_configs("seed", 32)
    assert view1 == view2
    assert (view1.color_jitter_p, view1.brightness, view1.contrast) == (0.3, 0.8, 0.8)
    assert (view1.saturation, view1.hue, view1.color_jitter_style) == (0.8, 0.2, "torchvision")
    assert (view1.grayscale_p, view1.flip_p, view1.blur_p, view1.solarize_p) == (0.2, 0.5, 0.2, 0)
    assert (view1.blur_kernel_size, view1.blur_sigma) == (3, (1.0, 2.0))
    assert view1.crop_last and view1.resize_method == "bilinear"


@pytest.mark.parametrize("as_config_dict", [False, True])
def test_recipes_from_a_config(as_config_dict):
    values = {
        "name": "byol",
        "image_size": 32,
        "crop": False,
        "view1": {"blur_p": 0.5},
        "view2": {"solarize_p": 0.1, "crop_area": [0.2, 1.0]},
    }
    config = ml_collections.ConfigDict(values) if as_config_dict else values
    view1, view2 = augment.from_config(config)
    assert (view1.config.blur_p, view1.config.solarize_p) == (0.5, 0.0)
    assert (view2.config.blur_p, view2.config.solarize_p) == (0.1, 0.1)
    assert view2.config.crop_area == (0.2, 1.0)
    assert not view1.config.crop and not view2.config.crop and view1.config.image_size == 32


def test_unknown_recipe_and_field_names_are_refused():
    with pytest.raises(ValueError, match="recipe"):
        augment.recipe("simclr", 32)
    with pytest.raises(ValueError, match="blur_prob"):
        augment.recipe("byol", 32, view1={"blur_prob": 0.5})
    with pytest.raises(ValueError, match="image_size"):
        augment.from_config({"name": "byol"})
