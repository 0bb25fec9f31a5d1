"""The base configurations the files in configs/ start from: pre-training (``get_config``, the
paper's recipe) and linear evaluation (``linear_eval_config``, the paper's protocol).

Config files are Python: ``get_config()`` returns an ml_collections ConfigDict, and any field
can be overridden on the command line with ``--config.field=value``. Fields are typed:
an override of the wrong type, or of a field that does not exist, is an error.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib

import ml_collections
from ml_collections import config_dict

from byol_jax import augment
from byol_jax import data as datasets

# The official code's presets by pre-training length (docs/recipe.md#epoch-presets).
EPOCH_PRESETS = {
    40: dict(base_learning_rate=0.45, base_tau=0.97, weight_decay=1e-6),
    100: dict(base_learning_rate=0.45, base_tau=0.99, weight_decay=1e-6),
    300: dict(base_learning_rate=0.3, base_tau=0.99, weight_decay=1e-6),
    1000: dict(base_learning_rate=0.2, base_tau=0.996, weight_decay=1.5e-6),
}


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Networks.
    config.encoder = "resnet50"  # 'resnet18' ... 'resnet200', 'tiny', or 'resnet' with:
    config.stage_sizes = ()  # encoder 'resnet': blocks per stage, e.g. (3, 4, 6, 3)
    config.bottleneck = True  # encoder 'resnet': bottleneck blocks (else basic ones)
    config.width_multiplier = 1  # the paper's x2, x4
    config.num_filters = 64  # channels of the first ResNet stage before the multiplier
    config.cifar_stem = False  # 3x3 stride-1 stem without max-pool, for 32 px images
    config.padding = "symmetric"  # ResNet padding: torchvision's, or 'same' (the authors' code)
    config.hidden_layer = config_dict.placeholder(str)  # None: the encoder's pooled output
    config.projection_size = 256
    config.projection_hidden_size = 4096
    config.use_momentum = True  # False: SimSiam mode
    # Start from imported weights: 'official:PATH' (the authors' checkpoint), 'torchvision:PATH'
    # (.safetensors or .pth) or a byol_jax workdir; a run that has checkpoints resumes instead.
    config.pretrained = ""
    config.views_in_one_batch = False  # True: one BatchNorm batch for both views (the seed)
    config.sync_batchnorm = config_dict.placeholder(bool)  # None: when over >1 device
    config.dtype = "auto"  # compute dtype: 'auto' (bfloat16 on GPU/TPU, float32 on CPU), or either

    # Optimisation.
    config.batch_size = 4096  # global, over all devices and hosts
    config.num_epochs = 1000
    config.total_steps = -1  # > 0 overrides num_epochs
    config.optimizer = "lars"  # 'lars', 'adam', 'adamw', 'sgd'
    config.base_learning_rate = 0.2  # scaled by batch_size / 256 (linear scaling rule)
    config.reference_batch_size = 256  # 0: no scaling
    config.warmup_epochs = 10.0  # may be fractional; a warm-up longer than the run is an error
    config.warmup_fraction = config_dict.placeholder(float)  # set: warm-up = this part of the run
    config.lr_schedule = "cosine"  # 'cosine' or 'constant'
    config.weight_decay = 1.5e-6
    config.momentum = config_dict.placeholder(float)  # None: 0.9 (LARS, SGD); adam has none
    config.trust_coefficient = config_dict.placeholder(float)  # None: 1e-3 (LARS only)
    config.base_tau = 0.996
    config.tau_schedule = "cosine"  # 'cosine' (to 1 at the end) or 'constant'
    config.skip_nonfinite_steps = False  # True: skip (and count) steps with NaN/inf

    # Data and augmentation.
    config.image_size = 224
    config.data = datasets.default_data_config()
    config.augment = ml_collections.ConfigDict()
    config.augment.name = "byol"  # 'byol', 'byol_cifar', 'seed' (byol_jax.augment.RECIPES)
    config.augment.view1 = _view_overrides()  # e.g. --config.augment.view2.solarize_p=0.1
    config.augment.view2 = _view_overrides()

    # Running.
    config.parallel = "shard_map"  # or "pmap" (same results; shard_map was faster on the CPU)
    config.log_every = 100
    config.checkpoint_every = 1000
    config.keep_checkpoints = 3
    config.progress_bar = True
    config.distributed = False  # True: jax.distributed.initialize (auto-detects TPU pods)
    config.coordinator_address = ""  # for clusters JAX does not detect, e.g. '10.0.0.1:1234'
    config.num_processes = 0
    config.process_id = -1

    # Evaluation during and after pre-training.
    config.online_probe = True  # a linear classifier on the stopped representation (labels)
    config.knn_every = 0  # steps between kNN monitors (0: at the end only)
    config.knn_k = 200
    config.knn_temperature = 0.1
    config.knn_at_end = True
    config.knn_baseline = False  # also score a randomly initialised encoder, for comparison
    config.eval_batch_size = 256
    return config


def linear_eval_config() -> ml_collections.ConfigDict:
    """The linear-evaluation settings every file in configs/linear_eval/ starts from."""
    config = ml_collections.ConfigDict()
    config.pretrained_workdir = ""  # the workdir of a byol_jax.train run, or:
    config.pretrained = ""  # any pretrained.load source: official:PATH, torchvision:PATH, a workdir
    config.seed = 0

    # The paper's protocol.
    config.batch_size = 1024  # global, over all devices and hosts
    config.num_epochs = 80
    config.total_steps = -1  # > 0 overrides num_epochs
    config.base_learning_rate = 0.2  # scaled by batch_size / reference_batch_size
    config.reference_batch_size = 256  # 0: no scaling
    config.momentum = 0.9
    config.nesterov = True
    config.weight_decay = 0.0

    # Data: every field None keeps the pre-training run's config.data value.
    config.image_size = config_dict.placeholder(int)  # None: the pre-training image size
    config.data = _data_overrides()
    config.holdout_split = ""  # also scored at the end, for model selection ('' = none)

    # Running.
    config.parallel = "shard_map"  # or "pmap": same results
    config.log_every = 100
    config.checkpoint_every = 1000
    config.keep_checkpoints = 2
    config.progress_bar = True
    config.eval_batch_size = 256  # per process
    config.distributed = False
    config.coordinator_address = ""
    config.num_processes = 0
    config.process_id = -1
    return config


def _data_overrides() -> ml_collections.ConfigDict:
    """One typed placeholder per field of ``byol_jax.data.default_data_config``."""
    overrides = ml_collections.ConfigDict()
    for name, value in datasets.default_data_config().items():
        overrides[name] = config_dict.placeholder(type(value))
    return overrides


def _view_overrides() -> ml_collections.ConfigDict:
    """One placeholder per ViewConfig field: None keeps the recipe's value."""
    overrides = ml_collections.ConfigDict()
    for field in dataclasses.fields(augment.ViewConfig):
        if field.name == "image_size":
            continue  # always config.image_size
        default = getattr(augment.ViewConfig(), field.name)
        kind = int if field.name == "blur_kernel_size" else type(default)
        setattr(overrides, field.name, config_dict.placeholder(kind))
    return overrides


def view_overrides(view: ml_collections.ConfigDict) -> dict:
    """The fields of config.augment.view1/2 that a config or the command line set."""
    return {k: v for k, v in view.to_dict().items() if v is not None}


def apply_epoch_preset(config: ml_collections.ConfigDict, epochs: int) -> None:
    """Set num_epochs and the official code's learning rate, tau and weight decay for it."""
    if epochs not in EPOCH_PRESETS:
        raise ValueError(f"No preset for {epochs} epochs: choose one of {sorted(EPOCH_PRESETS)}.")
    config.num_epochs = epochs
    for key, value in EPOCH_PRESETS[epochs].items():
        setattr(config, key, value)


def from_file(path, *overrides: tuple[str, object]) -> ml_collections.ConfigDict:
    """The config a file's ``get_config()`` returns (``path:arg`` passes arg, as on the command
    line), with (dotted key, value) overrides applied as ``--config.key=value`` would be."""
    path, _, arg = str(path).partition(":")
    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    if spec is None or not pathlib.Path(path).is_file():
        raise ValueError(f"no config file {path!r}: pass the path of a file like configs/*.py.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    for key, value in overrides:
        *parents, last = key.split(".")
        target = config
        for part in parents:
            target = target[part]
        target[last] = value
    return config
