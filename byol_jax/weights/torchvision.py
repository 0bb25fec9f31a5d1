"""torchvision ResNets (resnet18/34/50/101/152) in and out of byol_jax.

``read(path)`` reads a state dict: ``.safetensors`` with the safetensors package (no PyTorch
needed), ``.pth`` / ``.pt`` with ``torch.load`` when PyTorch is importable. ``to_byol_jax``
maps its keys onto ``networks.ResNet`` (the 7x7 stem, width 1, symmetric padding: exactly
torchvision's network), ``from_byol_jax`` maps back, and ``save`` writes a safetensors file
that ``torchvision.models.resnetNN().load_state_dict(..., strict=True)`` accepts (with
``model.fc = torch.nn.Identity()`` first when there is no head).

Layouts: convolution kernels HWIO <-> OIHW, linear kernels (in, out) <-> (out, in);
BatchNorm scale/bias/mean/var <-> weight/bias/running_mean/running_var, and
num_batches_tracked (int64, not used in inference) written as 0.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import numpy as np

BOTTLENECK_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}
BASIC_DEPTHS = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34}
_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


class TorchvisionWeightsError(ValueError):
    """Not a torchvision ResNet state dict byol_jax can read, or an encoder it cannot write."""


def read(path: str) -> dict[str, np.ndarray]:
    """The state dict in ``path`` as numpy arrays (a 'state_dict' or 'model' entry and a
    'module.' prefix, as training scripts save them, are unwrapped)."""
    path = str(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file  # noqa: PLC0415

            tensors = load_file(path)
        elif path.endswith((".pth", ".pt")):
            tensors = _torch_load(path)
        else:
            raise TorchvisionWeightsError(f"{path}: give a .safetensors, .pth or .pt file.")
    except FileNotFoundError:
        raise TorchvisionWeightsError(f"no weights file {path!r}.") from None
    except TorchvisionWeightsError:
        raise
    except Exception as error:  # safetensors / torch raise their own types for bad files
        raise TorchvisionWeightsError(
            f"cannot read {path} ({type(error).__name__}: {str(error).strip()[:200]}): the file "
            "may be truncated or not a state dict; download or export it again."
        ) from error
    return {re.sub(r"^module\.", "", k): np.asarray(v) for k, v in tensors.items()}


def _torch_load(path: str) -> dict:
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        raise TorchvisionWeightsError(
            f"reading {path} needs PyTorch (a .pth file is a torch pickle): pip install torch, "
            "or convert it once to .safetensors (safetensors.torch.save_file), which byol_jax "
            "reads without PyTorch."
        ) from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    return {k: v.numpy() for k, v in state.items() if hasattr(v, "numpy")}


def depth_of(state: Mapping[str, np.ndarray]) -> int:
    """The ResNet depth a state dict's keys describe; an error names what it found."""
    counts = [
        len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5)
    ]
    bottleneck = any(".conv3." in k for k in state)
    depth = (BOTTLENECK_DEPTHS if bottleneck else BASIC_DEPTHS).get(tuple(counts))
    if depth is None or "conv1.weight" not in state:
        raise TorchvisionWeightsError(
            f"unknown architecture: {'bottleneck' if bottleneck else 'basic'} blocks per layer "
            f"{tuple(counts)}; byol_jax reads torchvision's resnet18/34/50/101/152."
        )
    return depth


def _block_name(name: str) -> str:
    """A torchvision module inside a block -> byol_jax's ('conv1' -> 'Conv_0', ...)."""
    if name.startswith("conv"):
        return f"Conv_{int(name[4:]) - 1}"
    if name.startswith("bn"):
        return f"BatchNorm_{int(name[2:]) - 1}"
    return {"downsample.0": "shortcut_conv", "downsample.1": "shortcut_bn"}[name]


def _our_module(key: str) -> tuple[str, str]:
    """'layer2.0.downsample.1.running_var' -> ('stage2_block1/shortcut_bn', 'running_var')."""
    if key.startswith(("conv1.", "bn1.")):
        module, leaf = key.split(".", 1)
        return {"conv1": "stem_conv", "bn1": "stem_bn"}[module], leaf
    found = re.fullmatch(r"layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.(\w+)", key)
    if not found:
        raise TorchvisionWeightsError(f"cannot place the key {key!r} in a torchvision ResNet.")
    return f"stage{found[1]}_block{int(found[2]) + 1}/{_block_name(found[3])}", found[4]


def to_byol_jax(state: Mapping[str, np.ndarray]) -> tuple[dict, dict, dict | None]:
    """(encoder params, encoder batch_stats, the fc head as {'kernel', 'bias'} or None)."""
    depth_of(state)
    params, stats = {}, {}
    head = None
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key in ("fc.weight", "fc.bias"):
            head = head or {}
            head["kernel" if key == "fc.weight" else "bias"] = value.T if value.ndim == 2 else value
            continue
        module, leaf = _our_module(key)
        if leaf in ("running_mean", "running_var"):
            _nested(stats, module)[_BN[leaf]] = value.astype(np.float32)
        elif value.ndim == 4:  # convolution: OIHW -> HWIO
            _nested(params, module)["kernel"] = np.transpose(value, (2, 3, 1, 0))
        elif leaf in _BN:
            _nested(params, module)[_BN[leaf]] = value
        else:
            raise TorchvisionWeightsError(f"cannot place the key {key!r} ({value.shape}).")
    return params, stats, head


def from_byol_jax(params: dict, stats: dict, head: dict | None = None) -> dict[str, np.ndarray]:
    """byol_jax ResNet params/stats (and a linear head) -> a torchvision state dict."""
    state = {}
    names = {"stem_conv": "conv1", "stem_bn": "bn1"}
    for module, leaves in _flat_modules(params).items():
        if "/" in module:
            stage, sub = module.split("/")
            found = re.fullmatch(r"stage(\d)_block(\d+)", stage)
            prefix = f"layer{found[1]}.{int(found[2]) - 1}.{_torch_block_name(sub)}"
        else:
            prefix = names[module]
        if "kernel" in leaves:
            state[f"{prefix}.weight"] = np.transpose(np.asarray(leaves["kernel"]), (3, 2, 0, 1))
            continue
        module_stats = _get(stats, module)
        state[f"{prefix}.weight"] = np.asarray(leaves["scale"])
        state[f"{prefix}.bias"] = np.asarray(leaves["bias"])
        state[f"{prefix}.running_mean"] = np.asarray(module_stats["mean"])
        state[f"{prefix}.running_var"] = np.asarray(module_stats["var"])
        state[f"{prefix}.num_batches_tracked"] = np.zeros((), np.int64)
    if head is not None:
        state["fc.weight"] = np.asarray(head["kernel"]).T
        state["fc.bias"] = np.asarray(head["bias"])
    return {k: np.array(v, order="C") for k, v in state.items()}  # 0-d stays 0-d


def _torch_block_name(name: str) -> str:
    if name.startswith("Conv_"):
        return f"conv{int(name[5:]) + 1}"
    if name.startswith("BatchNorm_"):
        return f"bn{int(name[10:]) + 1}"
    return {"shortcut_conv": "downsample.0", "shortcut_bn": "downsample.1"}[name]


def save(path: str, state: Mapping[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file  # noqa: PLC0415

    save_file(dict(state), str(path))


def _flat_modules(params: dict, prefix: str = "") -> dict[str, dict]:
    """{'stage1_block1/Conv_0': {'kernel': ...}, ...}: modules are dicts of arrays."""
    out = {}
    for name, value in params.items():
        path = f"{prefix}/{name}" if prefix else name
        if all(not isinstance(v, Mapping) for v in value.values()):
            out[path] = value
        else:
            out.update(_flat_modules(value, path))
    return out


def _get(tree: dict, path: str) -> dict:
    for part in path.split("/"):
        tree = tree[part]
    return tree


def _nested(tree: dict, path: str) -> dict:
    for part in path.split("/"):
        tree = tree.setdefault(part, {})
    return tree


def from_learner(learner, state, *, use_target: bool = False, with_head: bool = False) -> dict:
    """A learner's encoder (online, or target) as a torchvision state dict; the online probe
    as fc with ``with_head``. Only what torchvision's resnetNN computes can be written: the
    7x7 stem, width 1, 64 base channels, a depth it has."""
    from byol_jax import networks  # noqa: PLC0415

    encoder = learner.encoder
    if not isinstance(encoder, networks.ResNet):
        raise TorchvisionWeightsError(f"{type(encoder).__name__} is not a byol_jax ResNet: torchvision has no such network.")  # fmt: skip
    wanted = {"cifar_stem": False, "width_multiplier": 1, "num_filters": 64}
    off = {k: getattr(encoder, k) for k, v in wanted.items() if getattr(encoder, k) != v}
    stages = tuple(encoder.stage_sizes)
    known = BOTTLENECK_DEPTHS if encoder.block is networks.BottleneckBlock else BASIC_DEPTHS
    if stages not in known:
        off["stage_sizes"] = stages
    if off:
        raise TorchvisionWeightsError(
            f"torchvision's ResNets have the 7x7 stem, width 1 and 64 base channels; this encoder "
            f"has {off}: it cannot be written as a torchvision state dict."
        )
    if encoder.padding != "symmetric":
        import warnings  # noqa: PLC0415

        warnings.warn(
            f"this encoder pads {encoder.padding!r} (the authors' weights), torchvision pads "
            "symmetrically: the exported network's stem, max-pool and strided convolutions see "
            "their input shifted by a pixel, so its features differ slightly from byol_jax's.",
            stacklevel=2,
        )
    params = state.target_params if use_target else state.online_params
    stats = state.target_batch_stats if use_target else state.online_batch_stats
    head = params.get("probe") if with_head else None
    if with_head and head is None:
        raise TorchvisionWeightsError("with_head=True needs the online probe (num_classes), which this state lacks.")  # fmt: skip
    as_numpy = lambda tree: jax.tree.map(np.asarray, jax.device_get(tree))  # noqa: E731
    return from_byol_jax(
        as_numpy(params["encoder"]), as_numpy(stats["encoder"]), head and as_numpy(head)
    )
