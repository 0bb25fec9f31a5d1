"""On-device BYOL augmentations: two random views of a batch, per image, inside the step.

A view function has the signature ``view(key, images) -> views``: ``images`` is
``[N, H, W, C]`` uint8 (0-255) or float in [0, 1], ``views`` is ``float32 [N, S, S, 3]``,
normalised with the ImageNet mean and std. ``key`` is split into one key per image and
the per-image pipeline is ``vmap``-ed over them, so two copies of one image in a batch
get independent draws. Every shape is static: the function traces once per input shape
under ``jit``, ``pmap`` or ``shard_map``.

A view is described by a frozen :class:`ViewConfig` (probabilities, strengths, ranges)
and built with :func:`make_view`. Named recipes give the pairs of views:

* ``byol``: the paper's asymmetric views (blur p 1.0 / 0.1, solarize p 0.0 / 0.2);
* ``byol_cifar``: the same without blur, for 32 px images;
* ``seed``: byol-pytorch's default pipeline (torchvision semantics), drawn per image.

For ImageNet the host does the random resized crop (images differ in size there) and
the device runs the rest: ``crop=False`` says the input already has the output size. Host
and device crop with the same box sampler and resize (:mod:`byol_jax.image_ops`), so the
two places give the same image of the same box.

dm-pix supplies the primitives (brightness, contrast, HSV saturation and hue, solarize,
flip). It has no random resized crop, no apply-with-probability and no random order
of the colour ops; those are written here, and so are grayscale and the Gaussian blur,
whose dm-pix versions run several times slower under vmap on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import dm_pix as pix
import jax
import jax.numpy as jnp

from byol_jax import image_ops, view_ops

# What users imported from augment before these lived in image_ops / view_ops.
from byol_jax.image_ops import IMAGENET_MEAN, IMAGENET_STD, crop_and_resize  # noqa: F401
from byol_jax.view_ops import (  # noqa: F401
    color_jitter,
    gaussian_blur,
    per_image,
    random_resized_crop_box,
)

# The boolean per-image decisions a view draws, one per randomly applied op.
DECISIONS = ("flip", "color_jitter", "grayscale", "blur", "solarize")

AugmentFn = Callable[[jax.Array, jax.Array], jax.Array]

_JITTER_STYLES = ("byol", "torchvision")
_BLUR_PADDINGS = ("zeros", "reflect")


@dataclasses.dataclass(frozen=True)
class ViewConfig:
    """Everything one view draws and applies. The defaults are the BYOL paper's view 1.

    Op order: random resized crop (unless ``crop_last``), flip, colour jitter (the four
    ops in random order, clipped to [0, 1] after each), grayscale, Gaussian blur,
    solarize, random resized crop (if ``crop_last``), normalisation.

    Attributes:
      image_size: side S of the square output.
      crop: sample a random resized crop on device. ``False`` means the host already
        cropped: the input must be ``[N, S, S, C]`` and only the other ops run.
      crop_area: range of the crop's area as a fraction of the input's area (uniform).
      crop_ratio: range of the crop's width / height (log-uniform).
      crop_last: crop after the other ops (the seed's torchvision order).
      resize_method: ``'bicubic'`` (the paper) or ``'bilinear'`` (torchvision's default).
        Both resample with :func:`byol_jax.image_ops.crop_and_resize` (antialiased when
        shrinking), as the host's crops do.
      allow_upscale: allow ``image_size`` above the input's shorter side.
      flip_p: probability of a horizontal flip.
      color_jitter_p: probability of the colour jitter.
      brightness, contrast, saturation, hue: jitter strengths. ``'byol'`` style (official
        BYOL code): brightness adds a delta in [-b, b], contrast scales by a factor in
        [1 - c, 1 + c] around each channel's spatial mean, saturation scales the HSV
        saturation by [1 - s, 1 + s], hue shifts by [-h, h]. ``'torchvision'`` style
        (ColorJitter): brightness multiplies, contrast blends with the mean gray level,
        saturation blends with the grayscale image. Factors are floored at 0.
      color_jitter_style: ``'byol'`` or ``'torchvision'``.
      color_jitter_random_order: apply the four jitter ops in a random order per image.
      grayscale_p: probability of converting to grayscale (kept as 3 channels).
      blur_p: probability of a Gaussian blur.
      blur_sigma: range of the blur's sigma in pixels (uniform).
      blur_kernel_size: odd kernel side; ``None`` derives it from the image side as in
        the official code: ``2 * int(side / 20) + 1`` (about 10 % of the side; 1, i.e. no
        blur, below 20 px).
      blur_padding: ``'zeros'`` (official BYOL code) or ``'reflect'`` (torchvision).
      solarize_p: probability of solarizing (``x < threshold ? x : 1 - x``).
      solarize_threshold: solarization threshold.
      normalize: subtract ``mean`` and divide by ``std`` at the end.
      mean, std: per-channel normalisation constants (ImageNet by default).
      grayscale_to_rgb: accept C=1 input by repeating the channel three times.
    """

    image_size: int = 224
    crop: bool = True
    crop_area: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop_last: bool = False
    resize_method: str = "bicubic"
    allow_upscale: bool = False
    flip_p: float = 0.5
    color_jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    color_jitter_style: str = "byol"
    color_jitter_random_order: bool = True
    grayscale_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: int | None = None
    blur_padding: str = "zeros"
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    normalize: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    grayscale_to_rgb: bool = False

    def __post_init__(self):
        # Configs from ml_collections / YAML carry lists; tuples keep the config hashable.
        for name in ("crop_area", "crop_ratio", "blur_sigma", "mean", "std"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        _validate_view_config(self)


def _validate_view_config(c: ViewConfig) -> None:
    """Raises ValueError naming the field when a ViewConfig value is out of range."""
    if not isinstance(c.image_size, int) or c.image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {c.image_size!r}.")
    for name in ("flip_p", "color_jitter_p", "grayscale_p", "blur_p", "solarize_p"):
        p = getattr(c, name)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} is a probability and must lie in [0, 1], got {p}.")
    for name in ("brightness", "contrast", "saturation", "hue"):
        if getattr(c, name) < 0:
            raise ValueError(
                f"{name} is a jitter strength and must be >= 0, got {getattr(c, name)}."
            )
    if c.hue > 0.5:
        raise ValueError(f"hue must be <= 0.5 (a half turn of the colour wheel), got {c.hue}.")
    _check_range("crop_area", c.crop_area, upper=1.0)
    _check_range("crop_ratio", c.crop_ratio)
    _check_range("blur_sigma", c.blur_sigma)
    _check_choice("resize_method", c.resize_method, tuple(image_ops.RESIZE_METHODS))
    _check_choice("color_jitter_style", c.color_jitter_style, _JITTER_STYLES)
    _check_choice("blur_padding", c.blur_padding, _BLUR_PADDINGS)
    k = c.blur_kernel_size
    if k is not None and (not isinstance(k, int) or k < 1 or k % 2 == 0):
        raise ValueError(f"blur_kernel_size must be a positive odd int or None, got {k!r}.")
    if len(c.mean) != 3 or len(c.std) != 3 or min(c.std) <= 0:
        raise ValueError(f"mean and std need 3 values, std > 0; got {c.mean} and {c.std}.")


def _check_range(name: str, bounds: tuple[float, ...], upper: float = math.inf) -> None:
    if len(bounds) != 2 or not 0 < bounds[0] <= bounds[1] <= upper:
        raise ValueError(
            f"{name} must be (low, high) with 0 < low <= high <= {upper}, got {bounds}."
        )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.")


def blur_kernel_size(config: ViewConfig, side: int) -> int:
    """The static blur kernel side for images of ``side`` pixels (odd; 1 means no blur)."""
    if config.blur_kernel_size is not None:
        return config.blur_kernel_size
    # The official BYOL code: kernel_size = side / 10, radius = int(kernel_size / 2).
    return 2 * int(side / 10 / 2) + 1


# ---------------------------------------------------------------------------------------
# A view: draws per image, then applies them.
# ---------------------------------------------------------------------------------------


def sample_view_params(
    config: ViewConfig, key: jax.Array, images_shape: tuple[int, ...]
) -> dict[str, jax.Array]:
    """Draws everything random about one view of a batch, one key per image.

    These are the draws :func:`apply_view` uses, so the decisions can be inspected.

    Args:
      config: the view.
      key: one PRNG key for the batch.
      images_shape: ``(N, H, W, C)`` of the input batch.

    Returns:
      A dict of per-image arrays: booleans ``[N]`` for each of :data:`DECISIONS`;
      ``jitter_order`` int ``[N, 4]``; ``brightness``, ``contrast``, ``saturation``,
      ``hue`` and ``blur_sigma`` float ``[N]``; with ``config.crop`` also ``crop_box``
      float ``[N, 4]`` as ``(top, left, height, width)`` in input pixels.
    """
    n, height, width = images_shape[0], images_shape[1], images_shape[2]
    keys = jax.random.split(key, n)
    return jax.vmap(functools.partial(_sample_one, config, height, width))(keys)


def _sample_one(config: ViewConfig, height: int, width: int, key: jax.Array) -> dict:
    """One image's draws. Each op owns a subkey, so changing one setting moves no other draw."""
    k = dict(
        zip(("crop", "order", "jitter", "sigma") + DECISIONS, jax.random.split(key, 9), strict=True)
    )
    draws = {
        name: jax.random.bernoulli(k[name], getattr(config, f"{name}_p")) for name in DECISIONS
    }
    if config.color_jitter_random_order:
        # The ranks of 4 uniforms: a uniform permutation, cheaper to compile than permutation().
        draws["jitter_order"] = jnp.argsort(jax.random.uniform(k["order"], (4,))).astype(jnp.int32)
    else:
        draws["jitter_order"] = jnp.arange(4, dtype=jnp.int32)
    draws.update(_sample_jitter_amounts(config, k["jitter"]))
    lo, hi = config.blur_sigma
    draws["blur_sigma"] = jax.random.uniform(k["sigma"], minval=lo, maxval=hi)
    if config.crop:
        draws["crop_box"] = random_resized_crop_box(
            k["crop"], height, width, config.crop_area, config.crop_ratio
        )
    return draws


def _sample_jitter_amounts(config: ViewConfig, key: jax.Array) -> dict[str, jax.Array]:
    k_b, k_c, k_s, k_h = jax.random.split(key, 4)

    def factor(k, strength):
        return jax.random.uniform(k, minval=max(0.0, 1.0 - strength), maxval=1.0 + strength)

    if config.color_jitter_style == "byol":
        b = config.brightness
        brightness = jax.random.uniform(k_b, minval=-b, maxval=b)
    else:
        brightness = factor(k_b, config.brightness)
    return {
        "brightness": brightness,
        "contrast": factor(k_c, config.contrast),
        "saturation": factor(k_s, config.saturation),
        "hue": jax.random.uniform(k_h, minval=-config.hue, maxval=config.hue),
    }


def apply_view(config: ViewConfig, images: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
    """Applies one view's draws to a batch.

    Args:
      config: the view.
      images: ``[N, H, W, C]`` uint8 or float in [0, 1] (checked by :func:`prepare_images`).
      params: the draws of :func:`sample_view_params` for this batch.

    Returns:
      float32 ``[N, S, S, 3]``, normalised when ``config.normalize``.
    """
    images = prepare_images(config, images)
    return jax.vmap(functools.partial(_apply_one, config))(images, params)


def _apply_one(config: ViewConfig, image: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
    c = config
    if c.crop and not c.crop_last:
        image = crop_and_resize(image, p["crop_box"], c.image_size, c.resize_method)
    image = _apply_if(p["flip"], c.flip_p, pix.flip_left_right, image)
    jitter = functools.partial(
        color_jitter,
        order=p["jitter_order"],
        brightness=p["brightness"],
        contrast=p["contrast"],
        saturation=p["saturation"],
        hue=p["hue"],
        style=c.color_jitter_style,
    )
    image = _apply_if(p["color_jitter"], c.color_jitter_p, jitter, image)
    image = _apply_if(p["grayscale"], c.grayscale_p, view_ops.grayscale, image)
    kernel = blur_kernel_size(c, min(image.shape[0], image.shape[1]))
    if kernel > 1:
        blur = functools.partial(
            gaussian_blur, sigma=p["blur_sigma"], kernel_size=kernel, padding=c.blur_padding
        )
        image = _apply_if(p["blur"], c.blur_p, blur, image)
    solarize = functools.partial(pix.solarize, threshold=c.solarize_threshold)
    image = _apply_if(p["solarize"], c.solarize_p, solarize, image)
    if c.crop and c.crop_last:
        image = crop_and_resize(image, p["crop_box"], c.image_size, c.resize_method)
    image = jnp.clip(image, 0.0, 1.0)
    return image_ops.normalize(image, c.mean, c.std) if c.normalize else image


def _apply_if(decision: jax.Array, p: float, fn: Callable, image: jax.Array) -> jax.Array:
    """``fn(image)`` where ``decision``, else ``image``; an op drawn with p = 0 is not built.

    Under vmap a ``lax.cond`` on a per-image predicate runs both branches anyway, so a
    ``where`` says the same thing at the same cost.
    """
    if p == 0.0:
        return image
    return jnp.where(decision, fn(image), image)


def prepare_images(config: ViewConfig, images: jax.Array) -> jax.Array:
    """Checks a batch against ``config`` and converts it to float32 ``[N, H, W, 3]`` in [0, 1].

    Raises:
      TypeError: not an array, or a dtype other than uint8 / floating.
      ValueError: not ``[N, H, W, C]``; C other than 3 (C=1 needs ``grayscale_to_rgb``);
        with ``crop=False`` an input whose side is not ``image_size``; with ``crop=True`` an
        ``image_size`` above the input's shorter side unless ``allow_upscale``; a blur
        kernel larger than the image.
    """
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        raise TypeError(f"images must be an array [N, H, W, C], got {type(images).__name__}.")
    if images.ndim != 4:
        raise ValueError(
            f"images must be a batch [N, H, W, C], got shape {images.shape}; "
            "add a batch axis with images[None] for a single image."
        )
    images = image_ops.to_unit_float(images)
    images = _to_rgb(config, images)
    _check_sizes(config, images.shape[1], images.shape[2])
    return images


def _to_rgb(config: ViewConfig, images: jax.Array) -> jax.Array:
    channels = images.shape[-1]
    if channels == 3:
        return images
    if channels == 1 and config.grayscale_to_rgb:
        return jnp.repeat(images, 3, axis=-1)
    if channels == 1:
        raise ValueError(
            "images have 1 channel but the views need RGB; set grayscale_to_rgb=True in the "
            "ViewConfig (or recipe overrides) to repeat the channel."
        )
    raise ValueError(f"images must have 3 channels (RGB, NHWC), got shape {images.shape}.")


def _check_sizes(config: ViewConfig, height: int, width: int) -> None:
    size = config.image_size
    if not config.crop and (height, width) != (size, size):
        raise ValueError(
            f"crop=False expects images already cropped to {size}x{size}, got {height}x{width}; "
            "crop on the host to image_size, or set crop=True to crop on device."
        )
    if config.crop and size > min(height, width) and not config.allow_upscale:
        raise ValueError(
            f"image_size {size} is larger than the input images ({height}x{width}); lower "
            "image_size or set allow_upscale=True to upsample on purpose."
        )
    side = size if (config.crop and not config.crop_last) else min(height, width)
    kernel = blur_kernel_size(config, side)
    if config.blur_p > 0 and kernel > side:
        raise ValueError(f"blur_kernel_size {kernel} is larger than the {side} px image.")


@dataclasses.dataclass(frozen=True)
class View:
    """One view as a function ``(key, images[N, H, W, C]) -> float32 [N, S, S, 3]``.

    Hashable (usable as a static argument); ``sample`` and ``apply`` expose the two halves.
    """

    config: ViewConfig

    def __call__(self, key: jax.Array, images: jax.Array) -> jax.Array:
        images = prepare_images(self.config, images)
        return apply_view(self.config, images, self.sample(key, images.shape))

    def sample(self, key: jax.Array, images_shape: tuple[int, ...]) -> dict[str, jax.Array]:
        """The per-image draws of :func:`sample_view_params`."""
        return sample_view_params(self.config, key, images_shape)

    def apply(self, images: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
        """:func:`apply_view` with this view's config."""
        return apply_view(self.config, images, params)


def make_view(config: ViewConfig) -> View:
    """Builds the view function of ``config`` (see :class:`View`)."""
    if not isinstance(config, ViewConfig):
        raise TypeError(f"make_view takes a ViewConfig, got {type(config).__name__}.")
    return View(config)


# ---------------------------------------------------------------------------------------
# Recipes.
# ---------------------------------------------------------------------------------------


def _byol_views(image_size: int) -> tuple[ViewConfig, ViewConfig]:
    """The paper's asymmetric views (docs/recipe.md#per-view-table)."""
    view1 = ViewConfig(image_size=image_size, blur_p=1.0, solarize_p=0.0)
    return view1, dataclasses.replace(view1, blur_p=0.1, solarize_p=0.2)


def _byol_cifar_views(image_size: int) -> tuple[ViewConfig, ViewConfig]:
    """The paper's views without blur, as libraries run them on CIFAR-sized images."""
    view1, view2 = _byol_views(image_size)
    return dataclasses.replace(view1, blur_p=0.0), dataclasses.replace(view2, blur_p=0.0)


def _seed_views(image_size: int) -> tuple[ViewConfig, ViewConfig]:
    """byol-pytorch 0.8.2's default augmentation, one draw per image, same for both views.

    ColorJitter(0.8, 0.8, 0.8, 0.2) p 0.3, RandomGrayscale 0.2, flip 0.5, GaussianBlur
    3x3 sigma [1, 2] p 0.2, then RandomResizedCrop (bilinear) and ImageNet normalisation.
    """
    view = ViewConfig(
        image_size=image_size,
        crop_last=True,
        resize_method="bilinear",
        color_jitter_p=0.3,
        brightness=0.8,
        contrast=0.8,
        saturation=0.8,
        hue=0.2,
        color_jitter_style="torchvision",
        grayscale_p=0.2,
        blur_p=0.2,
        blur_sigma=(1.0, 2.0),
        blur_kernel_size=3,
        blur_padding="reflect",
        solarize_p=0.0,
    )
    return view, view


RECIPES: dict[str, Callable[[int], tuple[ViewConfig, ViewConfig]]] = {
    "byol": _byol_views,
    "byol_cifar": _byol_cifar_views,
    "seed": _seed_views,
}


def recipe_configs(
    name: str,
    image_size: int,
    *,
    view1: Mapping[str, Any] | None = None,
    view2: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> tuple[ViewConfig, ViewConfig]:
    """The two ViewConfigs of a named recipe, with overrides.

    Args:
      name: one of :data:`RECIPES` (``'byol'``, ``'byol_cifar'``, ``'seed'``).
      image_size: output side S.
      view1, view2: ViewConfig fields to change in one view only.
      **overrides: ViewConfig fields to change in both views (applied first).
    """
    if name not in RECIPES:
        raise ValueError(f"Unknown augmentation recipe {name!r}; choose one of {sorted(RECIPES)}.")
    base1, base2 = RECIPES[name](image_size)
    return (
        _replace(_replace(base1, overrides), view1 or {}),
        _replace(_replace(base2, overrides), view2 or {}),
    )


def _replace(config: ViewConfig, changes: Mapping[str, Any]) -> ViewConfig:
    fields = {f.name for f in dataclasses.fields(ViewConfig)}
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise ValueError(f"Unknown ViewConfig field(s) {unknown}; valid fields: {sorted(fields)}.")
    return dataclasses.replace(config, **changes)


def recipe(
    name: str,
    image_size: int,
    *,
    view1: Mapping[str, Any] | None = None,
    view2: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> tuple[View, View]:
    """The two view functions of a named recipe; arguments as in :func:`recipe_configs`."""
    config1, config2 = recipe_configs(name, image_size, view1=view1, view2=view2, **overrides)
    return make_view(config1), make_view(config2)


def configs_from_config(config: Mapping[str, Any] | Any) -> tuple[ViewConfig, ViewConfig]:
    """ViewConfigs from a dict or ml_collections ConfigDict.

    Example: ``{'name': 'byol', 'image_size': 32, 'view1': {'blur_p': 0.5},
    'view2': {'solarize_p': 0.1}, 'crop': False}``; keys other than ``name``,
    ``image_size``, ``view1`` and ``view2`` change both views.
    """
    values = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    missing = {"name", "image_size"} - set(values)
    if missing:
        raise ValueError(
            f"The augmentation config needs {sorted(missing)}, got keys {sorted(values)}."
        )
    name, image_size = values.pop("name"), values.pop("image_size")
    view1, view2 = values.pop("view1", None), values.pop("view2", None)
    return recipe_configs(name, image_size, view1=view1, view2=view2, **values)


def from_config(config: Mapping[str, Any] | Any) -> tuple[View, View]:
    """The two view functions described by a dict / ConfigDict (see :func:`configs_from_config`)."""
    config1, config2 = configs_from_config(config)
    return make_view(config1), make_view(config2)
