"""Objects from a config: the encoder, the learner, the optimiser and the compute dtype.

What ``python -m byol_jax.train`` builds, in one place, so that programs, ``pretrained.load``
and ahead-of-time compilation build the very same things from a config.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from byol_jax import augment, byol, default_config, ema, image_ops, networks, optim


def sample_images(config: ml_collections.ConfigDict) -> np.ndarray:
    """What ``learner.init`` needs of the images (their shape and dtype): uint8 [2, S, S, 3]."""
    return np.zeros((2, config.image_size, config.image_size, 3), np.uint8)


def build_encoder(config: ml_collections.ConfigDict, dtype=jnp.float32, backend: str | None = None):
    """The encoder module the config names. ``backend`` is where the step will run (default:
    this process's JAX backend); it decides whether the ResNet slices its batch
    (networks.split_batch)."""
    backend = backend or jax.default_backend()
    return networks.encoder_by_name(
        config.encoder,
        width_multiplier=config.width_multiplier,
        num_filters=config.num_filters,
        cifar_stem=config.cifar_stem,
        dtype=dtype,
        conv_chunk=networks.CPU_CONV_CHUNK if backend == "cpu" else None,
        padding=config.get("padding", "symmetric"),  # runs saved before the field existed
        **(
            {"stage_sizes": config.stage_sizes, "bottleneck": config.bottleneck}
            if config.encoder == "resnet"
            else {}
        ),  # fmt: skip
    )


def compute_dtype(name: str, backend: str | None = None):
    """'float32', 'bfloat16', or 'auto': bfloat16 on GPU/TPU (parameters, optimiser state, EMA
    and loss stay float32), float32 on the CPU, where bf16 was slower (README, "Measured").
    ``backend``: where the step will run (default: this process's JAX backend)."""
    if name == "auto":
        return jnp.float32 if (backend or jax.default_backend()) == "cpu" else jnp.bfloat16
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(name)
    if dtype is None:
        raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {name!r}.")
    return dtype


def build_learner(
    config: ml_collections.ConfigDict,
    total_steps: int,
    num_classes: int | None = None,
    backend: str | None = None,
) -> byol.BYOL:
    """The BYOL learner of a config: encoder, views, tau schedule, precision, and the online
    probe when ``config.online_probe`` and the data has ``num_classes`` classes. ``backend``
    (default: this process's) is the platform the step is built for: 'tpu' when compiling
    ahead of time for a TPU from a CPU host."""
    dtype = compute_dtype(config.dtype, backend)
    view1, view2 = augment.recipe_configs(
        config.augment.name,
        config.image_size,
        view1=default_config.view_overrides(config.augment.view1),
        view2=default_config.view_overrides(config.augment.view2),
        **({"crop": False} if config.data.host_crop else {}),
    )
    if config.tau_schedule == "cosine":
        tau = ema.cosine_tau_schedule(config.base_tau, total_steps)
    elif config.tau_schedule == "constant":
        tau = config.base_tau
    else:
        raise ValueError(
            f"tau_schedule must be 'cosine' or 'constant', got {config.tau_schedule!r}."
        )
    return byol.BYOL(
        build_encoder(config, dtype, backend),
        image_size=config.image_size,
        hidden_layer=config.hidden_layer,
        projection_size=config.projection_size,
        projection_hidden_size=config.projection_hidden_size,
        augment_fn=augment.make_view(view1),
        augment_fn2=augment.make_view(view2),
        moving_average_decay=tau,
        use_momentum=config.use_momentum,
        sync_batchnorm=config.sync_batchnorm,
        views_in_one_batch=config.views_in_one_batch,
        preprocess_fn=_eval_preprocess(view1),
        dtype=dtype,
        skip_nonfinite_steps=config.skip_nonfinite_steps,
        num_classes=num_classes if config.online_probe else None,
    )


# The ViewConfig fields of the crop: with data.host_crop the host crops and the device does not.
_CROP_FIELDS = ("crop", "crop_area", "crop_ratio", "crop_last", "resize_method", "allow_upscale")


def check_host_crop(config: ml_collections.ConfigDict) -> None:
    """With ``data.host_crop`` the device does not crop: its crop fields would be ignored."""
    if not config.data.host_crop:
        return
    for view in ("view1", "view2"):
        given = [f for f in _CROP_FIELDS if config.augment[view][f] is not None]
        if given:
            raise ValueError(
                f"config.augment.{view}.{given[0]} is set, but data.host_crop=True: the host "
                "crops both views with data.crop_area and data.crop_ratio and the device does not "
                f"crop again. Set --config.data.crop_area / data.crop_ratio instead of "
                f"augment.{view}.{given[0]}, or data.host_crop=False to crop on the device."
            )


def _eval_preprocess(view: augment.ViewConfig):
    """What the encoder sees at evaluation: the view's normalisation, no randomness."""
    if not view.normalize:
        return image_ops.to_unit_float
    return functools.partial(image_ops.normalize, mean=view.mean, std=view.std)


def build_optimizer(config: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int):
    """The config's optimiser with its learning-rate schedule (linear scaling, warm-up, decay)."""
    schedule = optim.learning_rate_schedule(
        config.base_learning_rate,
        batch_size=config.batch_size,
        total_steps=total_steps,
        warmup_steps=warmup_steps(config, total_steps, steps_per_epoch),
        schedule=config.lr_schedule,
        reference_batch_size=config.reference_batch_size or None,
    )
    return optim.create_optimizer(
        config.optimizer,
        schedule,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        trust_coefficient=config.trust_coefficient,
    )


def warmup_steps(config: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int) -> int:
    """The warm-up in steps: ``warmup_fraction`` of the run when set, else ``warmup_epochs``
    epochs. A warm-up that does not end before the run does is an error, never squeezed in."""
    if config.warmup_fraction is not None:
        if not 0.0 <= config.warmup_fraction < 1.0:
            raise ValueError(
                f"config.warmup_fraction must be in [0, 1), got {config.warmup_fraction}."
            )
        return int(config.warmup_fraction * total_steps)
    steps = int(config.warmup_epochs * steps_per_epoch)
    if steps >= total_steps:
        longest = (total_steps - 1) / steps_per_epoch
        raise ValueError(
            f"the warm-up of {config.warmup_epochs:g} epochs is {steps} steps "
            f"({steps_per_epoch} steps per epoch), but the run has only {total_steps} steps: "
            f"the learning rate would never leave the warm-up. Shorten it with "
            f"--config.warmup_epochs={math.floor(longest * 100) / 100:g} or less, or give it as "
            "a fraction of the run, e.g. --config.warmup_fraction=0.1."
        )
    return steps


def check_config(config: ml_collections.ConfigDict) -> None:
    """Clear errors for pre-training settings out of range, before anything is built."""
    positive = (
        "batch_size",
        "image_size",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "projection_size",
        "projection_hidden_size",
        "eval_batch_size",
        "width_multiplier",
        "num_filters",
    )
    for name in positive:
        if config[name] <= 0:
            raise ValueError(f"config.{name} must be positive, got {config[name]}.")
    if config.total_steps <= 0 and config.num_epochs <= 0:
        raise ValueError("set config.total_steps or config.num_epochs to a positive number.")
    if config.base_learning_rate < 0:
        raise ValueError(
            f"config.base_learning_rate must be >= 0, got {config.base_learning_rate}."
        )
    if not 0.0 <= config.base_tau <= 1.0:
        raise ValueError(f"config.base_tau must be in [0, 1], got {config.base_tau}.")
    if config.batch_size < 2:
        raise ValueError("config.batch_size must be at least 2 (BatchNorm needs batch statistics).")
    check_host_crop(config)


def check_encoder_input(config: ml_collections.ConfigDict, learner: byol.BYOL) -> None:
    """Images must survive the encoder's downsampling, and hidden_layer must exist."""
    stride = networks.total_stride(learner.encoder)
    if config.image_size < stride:
        raise ValueError(
            f"image_size {config.image_size} is smaller than the total stride {stride} of "
            f"{config.encoder}{' (3x3 stem)' if config.cifar_stem else ''}: use images of at "
            f"least {stride} px, or cifar_stem=True for small images."
        )
    size = config.image_size
    learner.check_hidden_layer(jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))
