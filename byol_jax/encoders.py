"""A user's encoder, as the learner sees it: parameters and BatchNorm statistics as pytrees,
a representation [N, D] from a chosen hidden layer, and cross-replica BatchNorm when mapped.

``adapt(module, hidden_layer)`` wraps a Flax Linen module or a Flax NNX module (any;
``byol_jax.networks`` or the user's). The wrapper is stateless: every call takes the
parameters and statistics it works on, so the learner's step stays a pure function.

* Linen: syncs its BatchNorm over devices when it declares an ``axis_name`` field and passes
  it to its BatchNorm layers (``byol_jax.networks`` does); ``train`` is passed to its
  ``__call__`` when it takes one.
* NNX: the module is split once into its graph, its ``nnx.Param`` and ``nnx.BatchStat``
  values (plain nested dicts in ``ByolState``) and the rest; each forward merges them back
  (``nnx.merge``, traced once under ``jit``), sets ``train()`` / ``eval()``, and points every
  ``nnx.BatchNorm`` at the device axis when syncing. Its parameters are the ones the module
  was built with (``learner.init``'s key does not redraw them).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import flax.linen as nn
import jax

from byol_jax import networks

PyTree = Any


def adapt(module: Any, hidden_layer: str | int | None = None) -> LinenEncoder | NnxEncoder:
    """The encoder wrapper for ``module``; a TypeError names what is accepted."""
    if isinstance(module, nn.Module):
        return LinenEncoder(module, hidden_layer)
    if _is_nnx(module):
        return NnxEncoder(module, hidden_layer)
    raise TypeError(
        f"encoder must be a flax.linen Module or a flax.nnx Module, got "
        f"{type(module).__name__}: wrap a Flax module (e.g. byol_jax.networks.ResNet18(), or "
        "your nnx.Module built with nnx.Rngs), not a function or another framework's model."
    )


def _is_nnx(module: Any) -> bool:
    try:
        from flax import nnx  # noqa: PLC0415 (only NNX users pay for it)
    except ImportError:  # a Flax without NNX
        return False
    return isinstance(module, nnx.Module)


class LinenEncoder:
    """A Linen module's forward as ``represent(params, stats, x, train, axis_name)``."""

    def __init__(self, module: nn.Module, hidden_layer: str | int | None):
        self.module = module
        self.hidden_layer = None if hidden_layer == -1 else hidden_layer
        self.name = type(module).__name__
        self._takes_train = "train" in inspect.signature(module.__call__).parameters
        self.can_sync = "axis_name" in {f.name for f in dataclasses.fields(module)}
        self.cannot_sync = (
            "has BatchNorm statistics but no `axis_name` field. Add a field "
            "`axis_name: str | None = None` to the module and pass it to its BatchNorm layers"
        )
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
            y = networks.join_batch(y)  # a ResNet layer's batch may come in slices (CPU)
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
    if "/".join(path) not in available and ".".join(path) not in available:
        raise ValueError(
            f"hidden_layer={layer!r} is not a submodule of {name}. Submodules called in its "
            f"forward pass: {sorted(available)}."
        )
    return path


class NnxEncoder:
    """An NNX module's forward as ``represent(params, stats, x, train, axis_name)``."""

    def __init__(self, module, hidden_layer: str | int | None):
        from flax import nnx  # noqa: PLC0415

        self.module = module
        self.hidden_layer = None if hidden_layer == -1 else hidden_layer
        self.name = type(module).__name__
        self._graph, self._params, self._stats, self._rest = nnx.split(
            module, nnx.Param, nnx.BatchStat, ...
        )
        if jax.tree.leaves(nnx.state(module, nnx.RngState)):
            raise ValueError(
                f"{self.name} holds random state (nnx.Rngs, e.g. for Dropout): BYOL's step does "
                "not thread it, so every step would draw the same numbers. Build the encoder "
                "without random layers (BYOL's encoders have none)."
            )
        owners = [m for _, m in nnx.iter_modules(module) if _owns(m, nnx.BatchStat)]
        # Cross-replica BatchNorm needs every statistic to live in an nnx.BatchNorm (axis_name).
        self.can_sync = all(isinstance(m, nnx.BatchNorm) for m in owners)
        self.cannot_sync = (
            "keeps BatchNorm statistics in a layer that is not an nnx.BatchNorm ("
            + ", ".join(sorted({type(m).__name__ for m in owners} - {"BatchNorm"}))
            + "). Use nnx.BatchNorm, whose axis_name byol_jax sets when the step is mapped"
        )
        self._hidden_path: tuple | None = None

    def init(self, key: jax.Array, x: jax.Array) -> tuple[PyTree, PyTree]:
        """(params, batch_stats) as plain nested dicts: the module's own values (``key`` is
        not used: an NNX module is initialised when it is built)."""
        from flax import nnx  # noqa: PLC0415

        del key, x
        copy = lambda state: jax.tree.map(jax.numpy.array, nnx.to_pure_dict(state))  # noqa: E731
        return copy(self._params), copy(self._stats)

    def _merged(self, params, stats):
        """A fresh module holding ``params`` and ``stats`` (inside a trace: new tracers)."""
        from flax import nnx  # noqa: PLC0415

        param_state = jax.tree.map(lambda v: v, self._params)
        nnx.replace_by_pure_dict(param_state, params)
        stat_state = jax.tree.map(lambda v: v, self._stats)
        if stats:
            nnx.replace_by_pure_dict(stat_state, stats)
        return nnx.merge(self._graph, param_state, stat_state, self._rest)

    def represent(self, params, stats, x, *, train: bool, axis_name: str | None = None):
        """-> (representation [N, D] from the hidden layer, flattened; new batch_stats)."""
        from flax import nnx  # noqa: PLC0415

        module = self._merged(params, stats)
        for _, sub in nnx.iter_modules(module):
            if isinstance(sub, nnx.BatchNorm):
                sub.axis_name = axis_name  # None: this device's batch only
        module.train() if train else module.eval()
        if self.hidden_layer is None:
            y = module(x)
        else:
            path = self.hidden_path(x)
            _, captured = nnx.capture(module, nnx.Intermediate, method_outputs=nnx.Intermediate)(x)
            captured = nnx.to_pure_dict(captured)
            for name in path:
                captured = captured[name]
            y = captured["__call__"][-1]  # the last call, as the seed's forward hook keeps
        new_stats = nnx.to_pure_dict(nnx.state(module, nnx.BatchStat)) if train else stats
        return y.reshape(y.shape[0], -1), new_stats

    def hidden_path(self, x=None) -> tuple:
        """The submodule path that ``hidden_layer`` names: attribute names and list indices
        ('blocks.3' -> ('blocks', 3)), or an index into the module's direct submodules in the
        order they were assigned (as torch's ``children()``)."""
        if self._hidden_path is None:
            from flax import nnx  # noqa: PLC0415

            paths = [p for p, _ in nnx.iter_modules(self.module) if p]
            available = {".".join(str(part) for part in p) for p in paths}
            children = [k for k, v in vars(self.module).items() if isinstance(v, nnx.Module)]
            path = _chosen_path(self.hidden_layer, self.name, children, available)
            self._hidden_path = tuple(int(p) if p.isdigit() else p for p in path)
        return self._hidden_path


def _owns(module, variable_type) -> bool:
    """Whether ``module`` itself (not a submodule) holds variables of ``variable_type``."""
    return any(isinstance(v, variable_type) for v in vars(module).values())
