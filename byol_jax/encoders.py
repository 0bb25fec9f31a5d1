"""A user's encoder, as the learner sees it: parameters and BatchNorm statistics as pytrees,
a representation [N, D] from a chosen hidden layer, and cross-replica BatchNorm when mapped.

``adapt(module, hidden_layer)`` wraps a Flax Linen module (any; ``byol_jax.networks`` or the
user's). The wrapper is stateless: every call takes the parameters and statistics it works
on, so the learner's step stays a pure function.

A Linen encoder syncs its BatchNorm over devices when it declares an ``axis_name`` field and
passes it to its BatchNorm layers (``byol_jax.networks`` does); ``train`` is passed to its
``__call__`` when it takes one.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import flax.linen as nn
import jax

PyTree = Any


def adapt(module: Any, hidden_layer: str | int | None = None) -> LinenEncoder:
    """The encoder wrapper for ``module``; a TypeError names what is accepted."""
    if isinstance(module, nn.Module):
        return LinenEncoder(module, hidden_layer)
    raise TypeError(
        f"encoder must be a flax.linen Module, got {type(module).__name__}: wrap a Flax "
        "module (e.g. byol_jax.networks.ResNet18()), not a function or an instance of another "
        "framework."
    )


class LinenEncoder:
    """A Linen module's forward as ``represent(params, stats, x, train, axis_name)``."""

    def __init__(self, module: nn.Module, hidden_layer: str | int | None):
        self.module = module
        self.hidden_layer = None if hidden_layer == -1 else hidden_layer
        self.name = type(module).__name__
        self._takes_train = "train" in inspect.signature(module.__call__).parameters
        self.can_sync = "axis_name" in {f.name for f in dataclasses.fields(module)}
        self._hidden_path: tuple[str, ...] | None = None

    def _bound(self, axis_name: str | None) -> nn.Module:
        return self.module.clone(axis_name=axis_name) if self.can_sync else self.module

    def _kwargs(self, train: bool) -> dict:
        return {"train": train} if self._takes_train else {}

    def init(self, key: jax.Array, x: jax.Array) -> tuple[PyTree, PyTree]:
        """(params, batch_stats) for inputs like x [N, H, W, C] ({} without BatchNorm)."""
        variables = self._bound(None).init(key, x, **self._kwargs(False))
        return variables["params"], variables.get("batch_stats", {})

    def represent(self, params, stats, x, *, train: bool, axis_name: str | None = None):
        """-> (representation [N, D] from the hidden layer, flattened; new batch_stats).
        In training mode BatchNorm uses batch statistics, averaged over ``axis_name``."""
        module = self._bound(axis_name)
        variables = {"params": params, **({"batch_stats": stats} if stats else {})}
        mutable = ["batch_stats"] if train and stats else []
        if self.hidden_layer is None:
            out = module.apply(variables, x, mutable=mutable or False, **self._kwargs(train))
            y, updates = out if mutable else (out, {})
        else:
            path = self.hidden_path(x)
            y, updates = module.apply(
                variables,
                x,
                mutable=mutable + ["intermediates"],
                capture_intermediates=lambda mdl, method: (
                    method == "__call__" and mdl.scope is not None and tuple(mdl.scope.path) == path
                ),
                **self._kwargs(train),
            )
            captured = updates.pop("intermediates")
            for name in path:
                captured = captured[name]
            y = captured["__call__"][-1]  # the last call, as the seed's forward hook keeps
        return y.reshape(y.shape[0], -1), updates.get("batch_stats", stats)

    def hidden_path(self, x) -> tuple[str, ...]:
        """The submodule path that ``hidden_layer`` names (x: an array or ShapeDtypeStruct of
        the input); a ValueError listing the submodules when there is none."""
        if self._hidden_path is None:
            self._hidden_path = self._resolve(x)
        return self._hidden_path

    def _resolve(self, x) -> tuple[str, ...]:
        called: list[tuple[str, ...]] = []  # module paths in the order their calls return

        def record(module, method):
            if method == "__call__" and module.path not in called:
                called.append(tuple(module.path))
            return False

        jax.eval_shape(
            lambda x: self.module.init(
                jax.random.key(0), x, capture_intermediates=record, **self._kwargs(False)
            ),
            jax.ShapeDtypeStruct(x.shape, x.dtype),
        )
        children = [path[0] for path in called if len(path) == 1]
        available = {"/".join(path) for path in called if path}
        return _chosen_path(self.hidden_layer, self.name, children, available)


def _chosen_path(layer, name: str, children: list[str], available: set[str]) -> tuple[str, ...]:
    """``layer`` (an index into the direct submodules in call order, or a path 'a/b' / 'a.b')
    -> the path, or a ValueError that lists what exists."""
    if isinstance(layer, int):
        if not -len(children) <= layer < len(children):
            raise ValueError(
                f"hidden_layer={layer} is out of range: {name} calls {len(children)} direct "
                f"submodules: {children}."
            )
        return (children[layer],)
    path = tuple(p for p in layer.replace(".", "/").split("/") if p)
    if "/".join(path) not in available:
        raise ValueError(
            f"hidden_layer={layer!r} is not a submodule of {name}. Submodules called in its "
            f"forward pass: {sorted(available)}."
        )
    return path
