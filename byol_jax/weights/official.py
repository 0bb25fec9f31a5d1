"""The BYOL authors' released checkpoints, read without Haiku, dill or their code.

Their files (google-deepmind/deepmind-research, byol/README.md: pretrain_res50x1.pkl,
pretrain_res200x2.pkl and the ablations; CC BY-NC 4.0) are dill pickles of
``dict(experiment_state=_ByolExperimentState(online_params, target_params, online_state,
target_state, opt_state), step=int, rng=array)``. Parameters and BatchNorm states are Haiku
mappings ``{module path: {name: numpy array}}``: 'res_net50/~/block_group_0/~/block_0/~/conv_0'
{'w'}, '.../batchnorm_0' {'scale', 'offset'} with state '.../batchnorm_0/~/mean_ema'
{'average', 'hidden', 'counter'}, 'projector/linear', 'projector/batch_norm',
'projector/linear_1' (no bias), the same under 'predictor/', and the online 'classifier'.

``read(path)`` unpickles with a whitelist (their named tuples become plain named tuples,
Haiku's frozendict / FlatMapping become dicts, numpy arrays stay numpy; anything else is an
error that names it). ``to_byol_jax(checkpoint)`` maps every key onto byol_jax's ResNet,
projector, predictor and probe names (a key it cannot place is an error that names it).

Numerics: their convolutions and max-pool pad 'SAME' (``networks.ResNet(padding='same')``),
BatchNorm has decay 0.9 and epsilon 1e-5 (``networks.BN_MOMENTUM``, ``BN_EPSILON``), inputs in
[0, 1] are normalised with the ImageNet mean and std inside the model (byol_jax's
``preprocess_fn`` / views do the same), the representation is the pooled last block group.
"""

from __future__ import annotations

import collections
import dataclasses
import pickle
import re

import numpy as np

from byol_jax import networks

# Blocks per group -> ResNet depth, for their bottleneck (v1.5) and basic blocks.
_BOTTLENECK_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152, (3, 24, 36, 3): 200}
_BASIC_DEPTHS = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34}
assert networks.BN_MOMENTUM == 0.9 and networks.BN_EPSILON == 1e-5  # the authors' BatchNorm


class OfficialCheckpointError(ValueError):
    """The file is not an authors' checkpoint byol_jax can read, or a key cannot be placed."""


# ----------------------------------------------------------------------------- unpickling


def _namedtuple(name, fields, *rest):
    """dill's ``_create_namedtuple(name, fields, module[, defaults])``: a plain namedtuple
    (their module paths, e.g. Google-internal ones, need not exist)."""
    return collections.namedtuple(name, fields)


def _create_array(f, args, state, npdict=None):
    """dill's ``_create_array``: how dill pickles every numpy array (``f`` is numpy's own
    ``_reconstruct``, resolved through this unpickler's whitelist)."""
    array = f(*args)
    array.__setstate__(state)
    return array


def _load_type(name):
    types = {"NoneType": type(None), "tuple": tuple, "list": list, "dict": dict, "int": int}
    if name not in types:
        raise OfficialCheckpointError(f"the checkpoint refers to the type {name!r} (dill).")
    return types[name]


_HAIKU_MAPPINGS = ("frozendict", "FlatMapping", "FlatMap")
_BUILTINS = {"int", "float", "complex", "tuple", "list", "dict", "set", "frozenset", "bytes",
             "bytearray", "str", "bool", "slice", "object"}  # fmt: skip


class _Unpickler(pickle.Unpickler):
    """Only what such a checkpoint holds: containers, numpy arrays and named tuples."""

    def find_class(self, module, name):
        if module == "dill._dill" and name == "_create_namedtuple":
            return _namedtuple
        if module == "dill._dill" and name == "_load_type":
            return _load_type
        if module == "dill._dill" and name == "_create_array":
            return _create_array
        if module.startswith("haiku.") and name in _HAIKU_MAPPINGS:
            return dict  # frozendict / FlatMapping pickle as (cls, (plain mapping,))
        if module in ("builtins", "__builtin__") and name in _BUILTINS:
            return getattr(__import__("builtins"), name)
        if module == "_codecs" and name == "encode" or module == "collections" and name == "OrderedDict":  # fmt: skip
            return super().find_class(module, name)
        if module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray") and name in (
            "ndarray", "dtype", "_reconstruct", "scalar",
        ):  # fmt: skip
            return super().find_class(module, name)
        if module.startswith("numpy") and name == "dtype":
            return np.dtype
        raise OfficialCheckpointError(
            f"the checkpoint refers to {module}.{name}, which an authors' BYOL checkpoint does "
            "not hold (only numpy arrays, Haiku mappings and named tuples are read)."
        )


def read(path: str) -> dict:
    """{'online_params', 'online_state', 'target_params', 'target_state', 'step'} of an
    authors' checkpoint file, as plain dicts of numpy arrays."""
    try:
        with open(path, "rb") as f:
            data = _Unpickler(f).load()
    except FileNotFoundError:
        raise OfficialCheckpointError(f"no checkpoint file {path!r}.") from None
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError) as error:
        if isinstance(error, OfficialCheckpointError):
            raise
        raise OfficialCheckpointError(
            f"{path} is not a complete authors' BYOL checkpoint ({type(error).__name__}: "
            f"{error}); the file may be truncated: download it again."
        ) from error
    state = data.get("experiment_state") if isinstance(data, dict) else None
    fields = ("online_params", "online_state", "target_params", "target_state")
    if state is None or not all(hasattr(state, f) for f in fields):
        raise OfficialCheckpointError(
            f"{path} is a pickle but not an authors' BYOL checkpoint: expected "
            f"dict(experiment_state=({', '.join(fields)}, ...), step, rng)."
        )
    out = {f: _plain(getattr(state, f)) for f in fields}
    return {**out, "step": int(data.get("step", 0))}


def _plain(tree) -> dict:
    return {
        k: {n: np.asarray(v) for n, v in dict(inner).items()} for k, inner in dict(tree).items()
    }


# ----------------------------------------------------------------------------- mapping


@dataclasses.dataclass
class Architecture:
    """What the checkpoint's shapes say about the networks."""

    stage_sizes: tuple[int, ...]
    bottleneck: bool
    depth: int | None  # None: a ResNet of its own stage sizes
    num_filters: int
    width_multiplier: int
    projection_hidden_size: int
    projection_size: int
    num_classes: int | None

    def encoder_fields(self) -> dict:
        """The byol_jax config fields of this encoder."""
        if self.depth is not None:
            fields = {"encoder": f"resnet{self.depth}"}
        else:
            fields = {"encoder": "resnet", "stage_sizes": self.stage_sizes, "bottleneck": self.bottleneck}  # fmt: skip
        return {**fields, "num_filters": self.num_filters, "width_multiplier": self.width_multiplier}  # fmt: skip


def architecture(params: dict) -> Architecture:
    """Stages, block kind, widths and head sizes from the online parameters' keys and shapes
    (the paper's ResNet-50 x1 and ResNet-200 x2, and any other ResNet v1 of theirs)."""
    prefix = _prefix(params)
    blocks = collections.Counter()
    for key in params:
        found = re.fullmatch(
            re.escape(prefix) + r"/~/block_group_(\d+)/~/block_(\d+)/~/conv_0", key
        )
        if found:
            blocks[int(found[1])] += 1
    stages = tuple(blocks[g] for g in range(len(blocks)))
    if not stages or 0 in stages:
        raise OfficialCheckpointError(f"unknown architecture: block groups {dict(blocks)}.")
    bottleneck = any(k.endswith("/~/conv_2") for k in params)
    depth = (_BOTTLENECK_DEPTHS if bottleneck else _BASIC_DEPTHS).get(stages)
    stem = params[_stem(params, prefix, "conv")]["w"].shape[-1]
    width = stem // 64 if stem % 64 == 0 else 1  # their stem is 64 x the width multiplier
    for key in ("projector/linear", "projector/linear_1", "predictor/linear", "predictor/linear_1"):
        if key not in params:
            raise OfficialCheckpointError(f"the checkpoint has no {key!r}: it is not a complete BYOL network.")  # fmt: skip
    hidden = params["projector/linear"]["w"].shape[1]
    out = params["projector/linear_1"]["w"].shape[1]
    classes = params["classifier"]["w"].shape[1] if "classifier" in params else None
    return Architecture(stages, bottleneck, depth, stem // width, width, hidden, out, classes)


def _prefix(params: dict) -> str:
    prefixes = {k.split("/~/block_group_")[0] for k in params if "/~/block_group_" in k}
    if len(prefixes) != 1:
        raise OfficialCheckpointError(
            f"cannot find the encoder: expected keys '<prefix>/~/block_group_N/...' with one "
            f"prefix (e.g. 'res_net50'), found {sorted(prefixes) or 'none'}."
        )
    return prefixes.pop()


def _stem(params: dict, prefix: str, kind: str) -> str:
    """Their stem module: 'initial_conv' or 'initial_conv_1' (some released files)."""
    name = "conv" if kind == "conv" else "batchnorm"
    found = [
        k for k in (f"{prefix}/~/initial_{name}", f"{prefix}/~/initial_{name}_1") if k in params
    ]
    if len(found) != 1:
        raise OfficialCheckpointError(
            f"expected one of {prefix}/~/initial_{name}[_1], found {found}."
        )
    return found[0]


def to_byol_jax(params: dict, state: dict) -> tuple[dict, dict]:
    """Their (params, state) of one network -> byol_jax's ({'encoder', 'projector',
    'predictor'[, 'probe']}, the BatchNorm statistics of the same parts). Every key is placed
    exactly once or an OfficialCheckpointError names it."""
    placed: set[str] = set()
    prefix = _prefix(params)
    out_params, out_stats = {}, {}
    modules = {"encoder": _encoder_modules(params, prefix), "projector": _mlp("projector"), "predictor": _mlp("predictor")}  # fmt: skip
    for part, mapping in modules.items():
        out_params[part], out_stats[part] = {}, {}
        for theirs, ours in mapping.items():
            _place(params, state, theirs, ours, out_params[part], out_stats[part], placed)
    if "classifier" in params:
        classifier = params["classifier"]
        out_params["probe"] = {"kernel": classifier["w"], "bias": classifier["b"]}
        placed.add("classifier")
    for mlp in ("projector", "predictor"):  # their last Linear has no bias: a zero bias is it
        dense = out_params[mlp]["Dense_1"]
        dense.setdefault("bias", np.zeros(dense["kernel"].shape[1], np.float32))
    _check_all_placed(params, state, placed)
    return out_params, out_stats


# Their module names inside a block -> byol_jax's (networks.BasicBlock / BottleneckBlock).
_BLOCK_MODULES = {
    **{f"conv_{i}": f"Conv_{i}" for i in range(3)},
    **{f"batchnorm_{i}": f"BatchNorm_{i}" for i in range(3)},
    "shortcut_conv": "shortcut_conv",
    "shortcut_batchnorm": "shortcut_bn",
}


def _encoder_modules(params: dict, prefix: str) -> dict[str, str]:
    """Their encoder module paths -> byol_jax ResNet paths ('stage1_block1/Conv_0', ...)."""
    mapping = {_stem(params, prefix, "conv"): "stem_conv", _stem(params, prefix, "bn"): "stem_bn"}
    pattern = re.compile(re.escape(prefix) + r"/~/block_group_(\d+)/~/block_(\d+)/~/(\w+)")
    for key in params:
        found = pattern.fullmatch(key)
        if not found:
            continue
        if found[3] not in _BLOCK_MODULES:
            raise OfficialCheckpointError(f"cannot place the checkpoint's module {key!r} in a ResNet block.")  # fmt: skip
        block = f"stage{int(found[1]) + 1}_block{int(found[2]) + 1}"
        mapping[key] = f"{block}/{_BLOCK_MODULES[found[3]]}"
    return mapping


def _mlp(name: str) -> dict[str, str]:
    return {f"{name}/linear": "Dense_0", f"{name}/batch_norm": "BatchNorm_0", f"{name}/linear_1": "Dense_1"}  # fmt: skip


def _place(params, state, theirs, ours, out_params, out_stats, placed) -> None:
    """One module: conv 'w' -> kernel (HWIO as is), linear 'w'/'b' -> kernel/bias,
    BatchNorm 'scale'/'offset' -> scale/bias and its EMA averages -> mean/var, as (C,)."""
    if theirs not in params:
        raise OfficialCheckpointError(f"the checkpoint has no {theirs!r}: it is not a complete BYOL network.")  # fmt: skip
    placed.add(theirs)
    module = params[theirs]
    target = _nested(out_params, ours)
    if "scale" in module or "offset" in module:
        target.update(scale=module["scale"].reshape(-1), bias=module["offset"].reshape(-1))
        stats = _nested(out_stats, ours)
        for ours_name, ema in (("mean", "mean_ema"), ("var", "var_ema")):
            key = f"{theirs}/~/{ema}"
            if key not in state:
                raise OfficialCheckpointError(f"the checkpoint's state has no {key!r}.")
            stats[ours_name] = state[key]["average"].reshape(-1)
            placed.add(key)
        return
    target["kernel"] = module["w"]
    if "b" in module:
        target["bias"] = module["b"]
    unknown = set(module) - {"w", "b"}
    if unknown:
        raise OfficialCheckpointError(f"cannot place {theirs!r}'s {sorted(unknown)}.")


def _nested(tree: dict, path: str) -> dict:
    for part in path.split("/"):
        tree = tree.setdefault(part, {})
    return tree


def _check_all_placed(params: dict, state: dict, placed: set[str]) -> None:
    left = sorted(set(params) - placed) + sorted(set(state) - placed)
    if left:
        raise OfficialCheckpointError(
            f"cannot place {len(left)} of the checkpoint's modules, e.g. {left[:3]}: byol_jax "
            "maps the authors' ResNet encoder, projector, predictor and classifier only."
        )
