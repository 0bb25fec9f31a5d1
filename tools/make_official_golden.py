"""A tiny checkpoint in the file layout of the BYOL authors' released checkpoints, plus golden outputs.

The authors' (google-deepmind/deepmind-research, folder byol/) pretrained checkpoints such as
`pretrain_res50x1.pkl` are dill pickles of their `_ByolExperimentState`, written by
`byol/utils/checkpointing.py` `Checkpointer`. This script rebuilds that layout with haiku itself,
at a small size and with random weights, so that byol_jax's loader can be tested without haiku,
dill or the real 570 MB download. The output files are committed; the test suite never runs this
script (it needs haiku and dill, which byol_jax does not depend on).

Environment (its own virtual environment, never byol_jax's):

    python3 -m venv /work/envs/haiku
    /work/envs/haiku/bin/pip install dm-haiku==0.0.13 jax==0.4.30 jaxlib==0.4.30 "numpy<2" dill==0.3.8

Checked with exactly: Python 3.11.7, dm-haiku 0.0.13, jax 0.4.30, jaxlib 0.4.30, numpy 1.26.4,
dill 0.3.8 (ml_dtypes 0.5.4, scipy 1.17.1 came with them). dm-haiku 0.0.17 + jax 0.10.2 + numpy 2
also runs the model, but numpy 2 pickles arrays under `numpy._core.multiarray`, while the 2020
files (numpy 1.x) say `numpy.core.multiarray`; numpy < 2 keeps that GLOBAL as in the real files.

Run from the repository root:

    /work/envs/haiku/bin/python tools/make_official_golden.py            # writes the two files below
    /work/envs/haiku/bin/python tools/make_official_golden.py --verify   # re-loads them and checks
    /work/envs/haiku/bin/python tools/make_official_golden.py --list     # prints module paths/shapes
    /work/envs/haiku/bin/python tools/make_official_golden.py --full /tmp/official_r50.pkl

Default outputs: `tests/data/official_tiny.pkl` and `tests/data/official_tiny_golden.npz`
(`--pkl` / `--npz` override). Rerunning writes identical numbers (fixed seeds, CPU, float32).

What is the same as the authors' code
-------------------------------------
* `ResNetTorso` / `ResNet50` / `MLP` / `_forward` are copies of DM `byol/utils/networks.py` and
  `byol/byol_experiment.py` (HEAD), with haiku's own `hk.nets.ResNet.BlockGroup` (BlockV1,
  bottleneck), so every module name is haiku's: the encoder class is named `ResNet50`, hence the
  prefix `res_net50`; `use_projection` in every group; strides (1, 2, 2, 2) on the 3x3 `conv_1`
  and the 1x1 `shortcut_conv`; `'SAME'` padding everywhere including the 3x3/2 max-pool after the
  stem; BatchNorm(create_scale, create_offset, decay_rate=0.9, eps=1e-5); stem `initial_conv`
  7x7/2 with `channels_per_group[0] // 4 * width_multiplier` outputs (64 * k for the real
  (256, ...) groups); representation = mean over H, W of block_group_3's output (no final BN).
* Images are RGB NHWC float32 in [0, 1] (`uint8 / 255`); `normalize_images` (ImageNet mean
  (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)) runs inside the transformed forward.
* Projector and predictor: Linear(+bias) -> BatchNorm -> ReLU -> Linear(no bias); the predictor is
  applied to the projector output; `classifier` = hk.Linear on stop_gradient(representation).
  `cross_replica_axis` is left out of bn_config (it only matters under pmap training).
* The file: `dill.dump(dict(experiment_state=_ByolExperimentState(online_params, target_params,
  online_state, target_state, opt_state), step=<int>, rng=<numpy uint32 [2]>), f, protocol=2)`,
  every leaf a numpy array (as after `jax.device_get(x[0])`), params/state in the containers that
  `hk.transform_with_state` of haiku 0.0.13 returns: plain `dict`s (outer key module path, inner
  key `w`/`b`/`scale`/`offset` or `average`/`hidden`/`counter`), keys in sorted order (the
  authors' `jax.tree_map` rebuilt them sorted). dill writes every NamedTuple class by value, as
  `dill._dill._create_namedtuple(name, fields, module)`; the module strings are those of the
  public code: `byol.byol_experiment` (`_ByolExperimentState`), `byol.utils.optimizers`
  (`AddWeightDecayState`, `ScaleByLarsState`), `optax._src.transform` (`ScaleState`). The real
  files name google3 modules instead; a loader must ignore the module.
* The GLOBALs in the written pickle (`python -m pickletools`), all there is to whitelist:
  `dill._dill _create_namedtuple` (REDUCE with (name, fields, module); instances by NEWOBJ),
  `dill._dill _create_array` (REDUCE with (f, args, state, npdict=None): `a = f(*args);
  a.__setstate__(state)`; dill 0.3.0-0.3.8 wrap every plain ndarray this way),
  `numpy.core.multiarray _reconstruct`, `numpy ndarray`, `numpy dtype` and `_codecs encode`
  (protocol 2 writes bytes as `encode(<latin-1 str>, 'latin1')`, stored UTF-8, so float data
  takes about 1.5 bytes per byte). Plain dicts, tuples, str, int, None need no GLOBAL.
* `opt_state` = `(AddWeightDecayState(), ScaleByLarsState(mu=<tree like online_params>),
  ScaleState())`, the state of their `optimizers.lars` (`optax.chain`); mu holds small random
  numbers. A loader ignores it.

Small size (the default file)
-----------------------------
blocks_per_group (1, 1, 1, 1); channels_per_group (16, 32, 64, 128), i.e. bottleneck widths
(4, 8, 16, 32); stem 4 = 16 // 4 channels; width multiplier 1; representation 128-d; projector
128 -> 32 -> 16; predictor 16 -> 32 -> 16; classifier 128 -> 10. Input 4 x 32 x 32 x 3.

Weights: haiku's initialisers with `jax.random.split(PRNGKey(seed))` for online / target (as their
`_make_initial_state`), then, with a numpy generator of its own per network: every BatchNorm
`scale` ~ U(0.5, 1.5) (so the zero-initialised `batchnorm_2` is not zero), `offset` ~ N(0, 0.2),
every Linear `b` ~ N(0, 0.1). The BatchNorm EMAs come from 8 training-mode steps on random images
(two views per step, as in their loss), then `average` gets mean += N(0, 0.25) * std and
var *= U(0.6, 1.6) (var floored at 1e-3 first), so no BatchNorm is an identity or matches the
batch. `hidden` is set equal to `average` (true of the released files, whose EMA counter is so
large that the zero-debias factor 1 - 0.9**counter is exactly 1 in float32), `counter` =
2 * step = 625560 (int32, shape ()), step = 312780. The target network is a different draw
everywhere (init key, numpy generator, calibration images), so swapping the two trees is caught.

Golden outputs (`tests/data/official_tiny_golden.npz`, `np.load(path)`, no pickle needed)
-----------------------------------------------------------------------------------------
All computed by haiku with `is_training=False` (BatchNorm uses `mean_ema/average` and
`var_ema/average`), float32, on the images below.

| key | dtype, shape | what |
| --- | --- | --- |
| `images` | uint8 [4, 32, 32, 3] | RGB NHWC; the model input is `images / 255` (float32) |
| `online_representation` | float32 [4, 128] | online encoder output (pooled block_group_3) |
| `online_projection` | float32 [4, 16] | online projector on the representation |
| `online_prediction` | float32 [4, 16] | online predictor on the online projection |
| `online_logits` | float32 [4, 10] | online `classifier` on the representation |
| `target_representation` | float32 [4, 128] | same, with target_params / target_state |
| `target_projection` | float32 [4, 16] | target projector |
| `target_prediction` | float32 [4, 16] | target predictor (exists in the target tree, unused in BYOL) |
| `target_logits` | float32 [4, 10] | target classifier (ditto) |
| `images_64x48` | uint8 [4, 64, 48, 3] | a second batch, H=64 != W=48 (another image seed) |
| `<each key above>_64x48` | float32, as above | e.g. `online_representation_64x48` [4, 128] |
| `config_json` | str, shape () | the sizes, BN settings, seeds and step above, as JSON |

Why the second batch: at 32 x 32 block_group_3's output is 1 x 1, so the spatial mean is not
exercised; at 64 x 48 it is 2 x 2 (64 -> 32 -> 16 -> 8 -> 4 -> 2, 48 -> 24 -> 12 -> 6 -> 3 -> 2),
every stride-2 layer of the H axis meets an even size (XLA 'SAME' pads (0, 1) there, unlike
PyTorch's symmetric (1, 1)), the W axis also meets odd sizes, and H != W catches an image or
kernel transposed between HW and WH.

`--full OUT.pkl` writes the same layout at full ResNet-50 x1 size (blocks (3, 4, 6, 3), channels
(256, 512, 1024, 2048), stem 64, projector 2048 -> 4096 -> 256, predictor 256 -> 4096 -> 256,
classifier 2048 -> 1000), random weights and random (uncalibrated) BatchNorm statistics, no golden
outputs: it is only for timing a loader on a file the size of the real one. Do not write it into
the repository.
"""

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import dill
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PKL = os.path.join(ROOT, "tests", "data", "official_tiny.pkl")
DEFAULT_NPZ = os.path.join(ROOT, "tests", "data", "official_tiny_golden.npz")

SEED = 20200812  # the date of the authors' first code drop
IMAGE_SEED = 7
STEP = 312_780  # about 1000 epochs of ImageNet at batch 4096
COUNTER = 2 * STEP  # two views per training step, so each BatchNorm EMA updates twice

TINY = dict(
    blocks_per_group=(1, 1, 1, 1),
    channels_per_group=(16, 32, 64, 128),
    width_multiplier=1,
    projector_hidden_size=32,
    projector_output_size=16,
    predictor_hidden_size=32,
    num_classes=10,
    image_size=32,
    batch=4,
)
FULL = dict(
    blocks_per_group=(3, 4, 6, 3),
    channels_per_group=(256, 512, 1024, 2048),
    width_multiplier=1,
    projector_hidden_size=4096,
    projector_output_size=256,
    predictor_hidden_size=4096,
    num_classes=1000,
    image_size=32,  # only for init: parameter shapes do not depend on it
    batch=1,
)
BN_CONFIG = dict(decay_rate=0.9, eps=1e-5, create_scale=True, create_offset=True)


# --- the checkpoint's NamedTuples, with the module names of the public code ------------------


class _ByolExperimentState(NamedTuple):
    """Byol's model and optimization parameters and state."""

    online_params: Any
    target_params: Any
    online_state: Any
    target_state: Any
    opt_state: Any


class AddWeightDecayState(NamedTuple):
    """Stateless transformation."""


class ScaleByLarsState(NamedTuple):
    mu: Any


class ScaleState(NamedTuple):
    """optax.scale's (empty) state, as in 2020 optax."""


_ByolExperimentState.__module__ = "byol.byol_experiment"
AddWeightDecayState.__module__ = "byol.utils.optimizers"
ScaleByLarsState.__module__ = "byol.utils.optimizers"
ScaleState.__module__ = "optax._src.transform"


# --- the authors' networks (DM byol/utils/networks.py), unchanged but for the stem rule ------


class MLP(hk.Module):
    """One hidden layer perceptron, with normalization."""

    def __init__(self, name: str, hidden_size: int, output_size: int, bn_config: Mapping[str, Any]):
        super().__init__(name=name)
        self._hidden_size = hidden_size
        self._output_size = output_size
        self._bn_config = bn_config

    def __call__(self, inputs, is_training: bool):
        out = hk.Linear(output_size=self._hidden_size, with_bias=True)(inputs)
        out = hk.BatchNorm(**self._bn_config)(out, is_training=is_training)
        out = jax.nn.relu(out)
        out = hk.Linear(output_size=self._output_size, with_bias=False)(out)
        return out


class ResNetTorso(hk.Module):
    """ResNet model (DM networks.py ResNetTorso)."""

    def __init__(
        self,
        blocks_per_group: Sequence[int],
        num_classes: int | None = None,
        bn_config: Mapping[str, float] | None = None,
        resnet_v2: bool = False,
        bottleneck: bool = True,
        channels_per_group: Sequence[int] = (256, 512, 1024, 2048),
        use_projection: Sequence[bool] = (True, True, True, True),
        width_multiplier: int = 1,
        name: str | None = None,
    ):
        super().__init__(name=name)
        self.resnet_v2 = resnet_v2
        bn_config = dict(bn_config or {})
        bn_config.setdefault("decay_rate", 0.9)
        bn_config.setdefault("eps", 1e-5)
        bn_config.setdefault("create_scale", True)
        bn_config.setdefault("create_offset", True)
        assert len(blocks_per_group) == 4 and len(channels_per_group) == 4

        # Theirs: output_channels=64 * width_multiplier, i.e. channels_per_group[0] / 4 * k.
        self.initial_conv = hk.Conv2D(
            output_channels=channels_per_group[0] // 4 * width_multiplier,
            kernel_shape=7,
            stride=2,
            with_bias=False,
            padding="SAME",
            name="initial_conv",
        )
        if not self.resnet_v2:
            self.initial_batchnorm = hk.BatchNorm(name="initial_batchnorm", **bn_config)

        self.block_groups = []
        strides = (1, 2, 2, 2)
        for i in range(4):
            self.block_groups.append(
                hk.nets.ResNet.BlockGroup(
                    channels=width_multiplier * channels_per_group[i],
                    num_blocks=blocks_per_group[i],
                    stride=strides[i],
                    bn_config=bn_config,
                    resnet_v2=resnet_v2,
                    bottleneck=bottleneck,
                    use_projection=use_projection[i],
                    name=f"block_group_{i}",
                )
            )
        if self.resnet_v2:
            self.final_batchnorm = hk.BatchNorm(name="final_batchnorm", **bn_config)
        # Created but never called, as theirs: no 'logits' parameters.
        self.logits = hk.Linear(num_classes, w_init=jnp.zeros, name="logits")

    def __call__(self, inputs, is_training, test_local_stats=False):
        out = inputs
        out = self.initial_conv(out)
        if not self.resnet_v2:
            out = self.initial_batchnorm(out, is_training, test_local_stats)
            out = jax.nn.relu(out)
        out = hk.max_pool(out, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding="SAME")
        for block_group in self.block_groups:
            out = block_group(out, is_training, test_local_stats)
        if self.resnet_v2:
            out = self.final_batchnorm(out, is_training, test_local_stats)
            out = jax.nn.relu(out)
        out = jnp.mean(out, axis=[1, 2])
        return out


class ResNet50(ResNetTorso):
    """ResNet50 (its class name gives the module prefix 'res_net50'); sizes overridable."""

    def __init__(
        self,
        num_classes=None,
        bn_config=None,
        resnet_v2=False,
        width_multiplier=1,
        blocks_per_group=(3, 4, 6, 3),
        channels_per_group=(256, 512, 1024, 2048),
        name=None,
    ):
        super().__init__(
            blocks_per_group=blocks_per_group,
            num_classes=num_classes,
            bn_config=bn_config,
            resnet_v2=resnet_v2,
            bottleneck=True,
            channels_per_group=channels_per_group,
            width_multiplier=width_multiplier,
            name=name,
        )


def normalize_images(images):
    """Normalize the image using ImageNet statistics (DM byol/utils/dataset.py)."""
    mean_rgb = (0.485, 0.456, 0.406)
    stddev_rgb = (0.229, 0.224, 0.225)
    normed_images = images - jnp.array(mean_rgb).reshape((1, 1, 1, 3))
    normed_images = normed_images / jnp.array(stddev_rgb).reshape((1, 1, 1, 3))
    return normed_images


def make_forward(cfg):
    """hk.without_apply_rng(hk.transform_with_state(_forward)) as in ByolExperiment.__init__."""

    def _forward(inputs, is_training):
        net = ResNet50(
            num_classes=None,
            bn_config=BN_CONFIG,
            width_multiplier=cfg["width_multiplier"],
            blocks_per_group=cfg["blocks_per_group"],
            channels_per_group=cfg["channels_per_group"],
        )
        projector = MLP(
            name="projector",
            hidden_size=cfg["projector_hidden_size"],
            output_size=cfg["projector_output_size"],
            bn_config=BN_CONFIG,
        )
        predictor = MLP(
            name="predictor",
            hidden_size=cfg["predictor_hidden_size"],
            output_size=cfg["projector_output_size"],
            bn_config=BN_CONFIG,
        )
        classifier = hk.Linear(output_size=cfg["num_classes"], name="classifier")

        def apply_once_fn(images, suffix=""):
            images = normalize_images(images)
            embedding = net(images, is_training=is_training)
            proj_out = projector(embedding, is_training)
            pred_out = predictor(proj_out, is_training)
            classif_out = classifier(jax.lax.stop_gradient(embedding))
            # 'representation' is extra (theirs returns the other three); it adds no module.
            return {
                "representation" + suffix: embedding,
                "projection" + suffix: proj_out,
                "prediction" + suffix: pred_out,
                "logits" + suffix: classif_out,
            }

        if is_training:
            return {
                **apply_once_fn(inputs["view1"], "_view1"),
                **apply_once_fn(inputs["view2"], "_view2"),
            }
        return apply_once_fn(inputs["images"], "")

    return hk.without_apply_rng(hk.transform_with_state(_forward))


# --- building the trees -----------------------------------------------------------------------


def _is_bn(module_path):
    last = module_path.split("/")[-1]
    return "batchnorm" in last or "batch_norm" in last


def _to_numpy(tree):
    """jax.device_get of every leaf, dicts rebuilt with sorted keys (as jax.tree_map does)."""
    if isinstance(tree, Mapping):
        return {k: _to_numpy(tree[k]) for k in sorted(tree)}
    return np.asarray(jax.device_get(tree))


def randomize_params(params, rs):
    out = {}
    for mod in sorted(params):
        out[mod] = {}
        for name in sorted(params[mod]):
            v = np.asarray(params[mod][name], np.float32)
            if _is_bn(mod) and name == "scale":
                v = rs.uniform(0.5, 1.5, v.shape)
            elif _is_bn(mod) and name == "offset":
                v = rs.normal(0.0, 0.2, v.shape)
            elif name == "b":
                v = rs.normal(0.0, 0.1, v.shape)
            out[mod][name] = np.asarray(v, np.float32)
    return out


def random_images(rs, cfg, n):
    return rs.uniform(0.0, 1.0, (n, cfg["image_size"], cfg["image_size"], 3)).astype(np.float32)


def finish_state(state, rs, calibrated):
    """Perturbs the EMA averages, sets hidden = average and a large counter."""
    out = {}
    for mod in sorted(state):
        assert mod.endswith("/~/mean_ema") or mod.endswith("/~/var_ema"), mod
        out[mod] = {}
    for mean_mod in sorted(m for m in state if m.endswith("/~/mean_ema")):
        var_mod = mean_mod[: -len("mean_ema")] + "var_ema"
        mean = np.asarray(state[mean_mod]["average"], np.float32)
        var = np.asarray(state[var_mod]["average"], np.float32)
        if calibrated:
            var = np.maximum(var, 1e-3)
            mean = mean + rs.normal(0.0, 0.25, mean.shape) * np.sqrt(var)
            var = var * rs.uniform(0.6, 1.6, var.shape)
        else:
            mean = rs.normal(0.0, 0.3, mean.shape)
            var = rs.uniform(0.5, 1.5, var.shape)
        for mod, avg in ((mean_mod, mean), (var_mod, var)):
            avg = np.asarray(avg, np.float32)
            out[mod] = {
                "average": avg,
                "counter": np.asarray(COUNTER, np.int32),
                "hidden": avg.copy(),
            }
    return out


def build_network(forward, cfg, key, rs, calibrate):
    dummy = jnp.zeros((cfg["batch"], cfg["image_size"], cfg["image_size"], 3), jnp.float32)
    params, state = jax.jit(forward.init, static_argnames="is_training")(
        key, {"view1": dummy, "view2": dummy}, is_training=True
    )
    params = randomize_params(_to_numpy(params), rs)
    state = _to_numpy(state)
    if calibrate:
        train = jax.jit(forward.apply, static_argnames="is_training")
        for _ in range(8):
            views = {"view1": random_images(rs, cfg, 16), "view2": random_images(rs, cfg, 16)}
            _, state = train(params, state, views, is_training=True)
        state = _to_numpy(state)
    state = finish_state(state, rs, calibrated=calibrate)
    return params, state


def momentum_like(params, rs):
    return {
        m: {
            n: (rs.standard_normal(v.shape, dtype=np.float32) * np.float32(1e-3))
            for n, v in sorted(params[m].items())
        }
        for m in sorted(params)
    }


def build_checkpoint(cfg, calibrate):
    forward = make_forward(cfg)
    rng_online, rng_target = jax.random.split(jax.random.PRNGKey(SEED))
    online_params, online_state = build_network(
        forward, cfg, rng_online, np.random.default_rng([SEED, 1]), calibrate
    )
    target_params, target_state = build_network(
        forward, cfg, rng_target, np.random.default_rng([SEED, 2]), calibrate
    )
    opt_state = (
        AddWeightDecayState(),
        ScaleByLarsState(mu=momentum_like(online_params, np.random.default_rng([SEED, 3]))),
        ScaleState(),
    )
    experiment_state = _ByolExperimentState(
        online_params=online_params,
        target_params=target_params,
        online_state=online_state,
        target_state=target_state,
        opt_state=opt_state,
    )
    rng = np.asarray(jax.device_get(jax.random.PRNGKey(SEED + 1)))
    assert rng.dtype == np.uint32 and rng.shape == (2,)
    return forward, dict(experiment_state=experiment_state, step=STEP, rng=rng)


def save_checkpoint(checkpoint_data, path):
    """As Checkpointer.maybe_save_checkpoint: dill protocol 2, written to _tmp then renamed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + "_tmp", "wb") as checkpoint_file:
        dill.dump(checkpoint_data, checkpoint_file, protocol=2)
    os.replace(path + "_tmp", path)


def golden_images(height=32, width=32, seed=IMAGE_SEED):
    rs = np.random.default_rng(seed)
    return rs.integers(0, 256, (TINY["batch"], height, width, 3), dtype=np.uint8)


def inference(forward, params, state, images_uint8):
    x = images_uint8.astype(np.float32) / np.float32(255.0)
    apply = jax.jit(forward.apply, static_argnames="is_training")
    out, _ = apply(params, state, {"images": x}, is_training=False)
    return {k: np.asarray(v) for k, v in out.items()}


def golden_outputs(forward, experiment_state, images, suffix=""):
    on = inference(forward, experiment_state.online_params, experiment_state.online_state, images)
    tg = inference(forward, experiment_state.target_params, experiment_state.target_state, images)
    res = {"images" + suffix: images}
    for prefix, out in (("online", on), ("target", tg)):
        for k in ("representation", "projection", "prediction", "logits"):
            res[f"{prefix}_{k}{suffix}"] = out[k].astype(np.float32)
    return res


def all_golden(forward, experiment_state, images, images_64x48):
    return {
        **golden_outputs(forward, experiment_state, images),
        **golden_outputs(forward, experiment_state, images_64x48, "_64x48"),
    }


def config_json(cfg):
    return json.dumps(
        dict(
            encoder="ResNet50 (prefix res_net50), ResNet v1 bottleneck, haiku BlockGroup/BlockV1",
            blocks_per_group=cfg["blocks_per_group"],
            channels_per_group=cfg["channels_per_group"],
            stem_channels=cfg["channels_per_group"][0] // 4 * cfg["width_multiplier"],
            width_multiplier=cfg["width_multiplier"],
            strides=(1, 2, 2, 2),
            padding="SAME",
            bn=dict(decay_rate=0.9, eps=1e-5, create_scale=True, create_offset=True),
            projector=(cfg["projector_hidden_size"], cfg["projector_output_size"]),
            predictor=(cfg["predictor_hidden_size"], cfg["projector_output_size"]),
            num_classes=cfg["num_classes"],
            input="uint8 RGB NHWC / 255, then (x - mean) / std inside the model",
            mean_rgb=(0.485, 0.456, 0.406),
            stddev_rgb=(0.229, 0.224, 0.225),
            seed=SEED,
            image_seed=IMAGE_SEED,
            step=STEP,
            counter=COUNTER,
            versions=dict(
                haiku=hk.__version__,
                jax=jax.__version__,
                numpy=np.__version__,
                dill=dill.__version__,
            ),
        ),
        sort_keys=True,
    )


def list_tree(name, tree):
    for mod in tree:
        print(
            f"  {name}  {mod}: "
            + ", ".join(
                f"{k} {tuple(np.shape(v))} {np.asarray(v).dtype}" for k, v in tree[mod].items()
            )
        )


def verify(pkl, npz):
    """Plain dill.load (as their load_checkpoint), then the haiku forward against the golden."""
    with open(pkl, "rb") as f:
        ckpt = dill.load(f)
    golden = np.load(npz, allow_pickle=False)
    assert list(ckpt) == ["experiment_state", "step", "rng"], list(ckpt)
    es = ckpt["experiment_state"]
    assert type(es).__name__ == "_ByolExperimentState" and es._fields == (
        "online_params",
        "target_params",
        "online_state",
        "target_state",
        "opt_state",
    )
    assert type(ckpt["step"]) is int and ckpt["step"] == STEP
    assert ckpt["rng"].dtype == np.uint32 and ckpt["rng"].shape == (2,)
    assert [type(s).__name__ for s in es.opt_state] == [
        "AddWeightDecayState",
        "ScaleByLarsState",
        "ScaleState",
    ]
    for tree in es[:4]:
        assert type(tree) is dict and all(type(v) is dict for v in tree.values())
        assert all(type(x) is np.ndarray for v in tree.values() for x in v.values())
    for m, v in es.online_state.items():
        np.testing.assert_array_equal(v["average"], v["hidden"])
        assert int(v["counter"]) == COUNTER and v["counter"].dtype == np.int32
        if m.endswith("var_ema"):
            assert (v["average"] > 0).all()
    assert es.online_params.keys() == es.target_params.keys()
    assert not np.allclose(
        es.online_params["res_net50/~/initial_conv"]["w"],
        es.target_params["res_net50/~/initial_conv"]["w"],
    )
    cfg = TINY
    forward = make_forward(cfg)
    got = all_golden(forward, es, golden["images"], golden["images_64x48"])
    assert sorted(got) == sorted(k for k in golden.files if k != "config_json"), golden.files
    worst = 0.0
    for k, v in got.items():
        if k.startswith("images"):
            continue
        np.testing.assert_allclose(v, golden[k], rtol=1e-5, atol=1e-6, err_msg=k)
        worst = max(worst, float(np.max(np.abs(v - golden[k]))))
    for k in ("representation", "projection", "prediction", "logits"):
        assert not np.allclose(golden["online_" + k], golden["target_" + k], atol=1e-3), k
    print(
        f"verify OK: {pkl} reproduces {npz} (max abs diff {worst:.3g}); "
        f"{len(es.online_params)} param modules, {len(es.online_state)} state modules"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pkl", default=DEFAULT_PKL)
    parser.add_argument("--npz", default=DEFAULT_NPZ)
    parser.add_argument("--verify", action="store_true", help="only re-load and check")
    parser.add_argument("--list", action="store_true", help="print the module paths and shapes")
    parser.add_argument(
        "--full",
        metavar="OUT.pkl",
        help="write a full-size ResNet-50 x1 file there instead (timing only)",
    )
    args = parser.parse_args(argv)

    if args.full:
        t0 = time.perf_counter()
        _, ckpt = build_checkpoint(FULL, calibrate=False)
        t1 = time.perf_counter()
        save_checkpoint(ckpt, args.full)
        t2 = time.perf_counter()
        n = sum(v.size for m in ckpt["experiment_state"].online_params.values() for v in m.values())
        print(
            f"{args.full}: {os.path.getsize(args.full):,} bytes; online tree {n:,} floats; "
            f"built in {t1 - t0:.1f} s, dill.dump in {t2 - t1:.1f} s"
        )
        return 0

    if args.verify:
        verify(args.pkl, args.npz)
        return 0

    forward, ckpt = build_checkpoint(TINY, calibrate=True)
    es = ckpt["experiment_state"]
    if args.list:
        list_tree("params", es.online_params)
        list_tree("state ", es.online_state)
    golden = all_golden(forward, es, golden_images(), golden_images(64, 48, seed=IMAGE_SEED + 1))
    golden["config_json"] = np.array(config_json(TINY))
    save_checkpoint(ckpt, args.pkl)
    os.makedirs(os.path.dirname(os.path.abspath(args.npz)), exist_ok=True)
    np.savez_compressed(args.npz, **golden)
    for k, v in golden.items():
        extra = "" if v.dtype.kind in "uU" else f" |max| {np.abs(v.astype(np.float32)).max():.3g}"
        print(f"  {k}: {v.dtype} {v.shape}{extra}")
    print(
        f"wrote {args.pkl} ({os.path.getsize(args.pkl):,} bytes) and "
        f"{args.npz} ({os.path.getsize(args.npz):,} bytes)"
    )
    verify(args.pkl, args.npz)
    return 0


if __name__ == "__main__":
    sys.exit(main())
