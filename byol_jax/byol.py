"""BYOL: the learner, its state, the loss, the EMA target and the per-replica train step.

The train step is written once, per replica, with an axis name. Run it as it is on one
device, or map it with ``jax.pmap`` / ``jax.shard_map`` (see ``byol_jax.parallel``): when
the axis is bound, gradients are averaged over it and, with ``sync_batchnorm``, BatchNorm
statistics are computed over the whole global batch.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from byol_jax import networks

PyTree = Any
AugmentFn = Callable[[jax.Array, jax.Array], jax.Array]
DEFAULT_AXIS = "batch"

# Mean / std of ImageNet in [0, 1] units, used to normalise images for the encoder.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@struct.dataclass
class ByolState:
    """Everything a BYOL run changes, as one pytree.

    ``online_params`` holds ``encoder``, ``projector`` and ``predictor``; ``target_params``
    holds ``encoder`` and ``projector`` only (the target has no predictor), or is None in
    SimSiam mode. BatchNorm statistics are kept apart from parameters: the EMA averages
    parameters only, and the target keeps statistics of its own.
    """

    step: jax.Array
    online_params: PyTree
    online_batch_stats: PyTree
    target_params: PyTree | None
    target_batch_stats: PyTree | None
    opt_state: optax.OptState
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


def regression_loss(p: jax.Array, z: jax.Array) -> jax.Array:
    """BYOL's loss per example: ``2 - 2 cos(p, z)``, the squared distance of the L2-normalised
    vectors. p, z: [N, D] -> [N], computed in float32."""
    p = p.astype(jnp.float32)
    z = z.astype(jnp.float32)
    # The epsilon matches torch.nn.functional.normalize (the seed): max(||x||, 1e-12).
    p = p / jnp.maximum(jnp.linalg.norm(p, axis=-1, keepdims=True), 1e-12)
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    return 2.0 - 2.0 * jnp.sum(p * z, axis=-1)


def cosine_tau_schedule(base_tau: float, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """The paper's EMA decay: tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2, from tau_base
    at step 0 to 1 at step K."""
    _check_tau(base_tau)
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive for the tau schedule, got {total_steps}.")

    def schedule(step):
        progress = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
        return 1.0 - (1.0 - base_tau) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0

    return schedule


def target_update(online_params: PyTree, target_params: PyTree, tau: jax.Array) -> PyTree:
    """The EMA target: ``tau * target + (1 - tau) * online`` for each part the target has
    (encoder and projector; the online predictor and probe have no target counterpart)."""
    online_part = {k: online_params[k] for k in target_params}
    return optax.incremental_update(online_part, target_params, 1.0 - tau)


def _check_tau(tau: float) -> None:
    if not (isinstance(tau, int | float) and 0.0 <= tau <= 1.0):
        raise ValueError(f"moving_average_decay (tau) must be a number in [0, 1], got {tau!r}.")


def normalize_images(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] or float [0, 1] images [..., 3] -> float32 normalised with ImageNet
    mean/std: what the default view functions end with, and what ``embed`` applies."""
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
        x = x / 255.0
    return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


class BYOL:
    """Bootstrap Your Own Latent around any Flax encoder.

    Args:
      encoder: a Flax module mapping images [N, H, W, C] to features. If its ``__call__``
        takes a ``train`` argument, it is passed (BatchNorm mode).
      image_size: the side of the (square) images the encoder sees after augmentation.
      hidden_layer: where the representation comes from. None (or -1) = the encoder's output;
        a str = the path of a submodule ('avgpool', 'stage4_block2', 'a/b'); an int = an index
        into the encoder's direct submodules in call order (the seed's ``hidden_layer=-2``).
        The chosen tensor is flattened to [N, D].
      projection_size, projection_hidden_size: sizes of the projector and predictor MLPs.
      augment_fn, augment_fn2: ``(key, images) -> images`` per view; the second defaults to the
        first. None selects the paper's ``byol`` recipe from ``byol_jax.augment``.
      moving_average_decay: tau, a float or a schedule ``step -> tau``.
      use_momentum: False is SimSiam mode: no target network; the target is the online
        projection under stop-gradient, and the projector is the 3-layer SimSiam MLP.
      sync_batchnorm: None = cross-replica BatchNorm whenever the step is mapped over more
        than one device; True/False force it.
      channels: the number of image channels the encoder takes (3 for RGB).
      views_in_one_batch: False (the default, the paper's code) runs each view through the
        networks on its own, so every BatchNorm layer normalises a view by that view's batch
        statistics. True sends both views in one call, sharing one set of statistics: what
        byol-pytorch does (docs/seed.md), and what the seed-parity tests and
        ``benchmarks/quality.py`` use.
      preprocess_fn: what ``embed`` applies to images before the encoder (default: ImageNet
        normalisation of uint8 or [0, 1] images).
      dtype: compute dtype of the projector and predictor (e.g. jnp.bfloat16); parameters,
        optimiser state, EMA and loss stay float32.
      num_classes: adds the online linear probe of the paper's code: a linear classifier on
        the stopped representation of view 1, trained in the same step by its own
        cross-entropy (needs ``labels`` in ``train_step``).
      skip_nonfinite_steps: a step whose loss or gradients are not finite leaves the state
        unchanged (apart from the step count) and reports ``skipped = 1``.
      axis_name: the name of the mapped device axis.
    """

    def __init__(
        self,
        encoder: nn.Module,
        image_size: int,
        hidden_layer: str | int | None = None,
        projection_size: int = 256,
        projection_hidden_size: int = 4096,
        augment_fn: AugmentFn | None = None,
        augment_fn2: AugmentFn | None = None,
        moving_average_decay: float | Callable[[jax.Array], jax.Array] = 0.99,
        use_momentum: bool = True,
        sync_batchnorm: bool | None = None,
        channels: int = 3,
        views_in_one_batch: bool = False,
        preprocess_fn: Callable[[jax.Array], jax.Array] | None = None,
        dtype: Any = jnp.float32,
        skip_nonfinite_steps: bool = False,
        num_classes: int | None = None,
        axis_name: str = DEFAULT_AXIS,
    ):
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be a flax.linen Module, got {type(encoder).__name__}.")
        for name, value in (
            ("image_size", image_size),
            ("projection_size", projection_size),
            ("projection_hidden_size", projection_hidden_size),
            ("channels", channels),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if hidden_layer is not None and not isinstance(hidden_layer, str | int):
            raise TypeError(f"hidden_layer must be None, a str or an int, got {hidden_layer!r}.")
        if not callable(moving_average_decay):
            _check_tau(moving_average_decay)
        if augment_fn is None and augment_fn2 is not None:
            raise ValueError(
                "augment_fn2 was given without augment_fn: give both or only the first."
            )
        self.encoder = encoder
        self.image_size = image_size
        self.channels = channels
        self.hidden_layer = None if hidden_layer == -1 else hidden_layer
        self.use_momentum = use_momentum
        self.sync_batchnorm = sync_batchnorm
        self.views_in_one_batch = views_in_one_batch
        self.skip_nonfinite_steps = skip_nonfinite_steps
        self.axis_name = axis_name
        self.tau = (
            moving_average_decay
            if callable(moving_average_decay)
            else lambda _: moving_average_decay
        )
        if augment_fn is None:
            from byol_jax import augment  # noqa: PLC0415 (lazy: custom augment users skip it)

            augment_fn, augment_fn2 = augment.recipe("byol", image_size)
        self.augment_fn = augment_fn
        self.augment_fn2 = augment_fn2 or augment_fn
        self.preprocess_fn = preprocess_fn or normalize_images
        projector_cls = networks.MLP if use_momentum else networks.SimSiamMLP
        self.projector = projector_cls(projection_hidden_size, projection_size, dtype=dtype)
        self.predictor = networks.MLP(projection_hidden_size, projection_size, dtype=dtype)
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"num_classes must be an int >= 2 for the probe, got {num_classes!r}.")
        self.num_classes = num_classes
        self.probe = nn.Dense(num_classes, name="probe") if num_classes else None
        self._encoder_takes_train = "train" in inspect.signature(encoder.__call__).parameters
        self._encoder_has_axis = "axis_name" in {f.name for f in dataclasses.fields(encoder)}
        self._hidden_path: tuple[str, ...] | None = None

    # ----------------------------------------------------------------------------- networks

    def _modules(self, bn_axis: str | None):
        """(encoder, projector, predictor) with BatchNorm reduced over ``bn_axis``."""
        encoder = self.encoder
        if self._encoder_has_axis:
            encoder = encoder.clone(axis_name=bn_axis)
        return (
            encoder,
            self.projector.clone(axis_name=bn_axis),
            self.predictor.clone(axis_name=bn_axis),
        )

    def _represent(self, encoder, params, stats, x, train):
        """Encoder forward -> (representation [N, D], new encoder batch stats)."""
        variables = {"params": params, **({"batch_stats": stats} if stats else {})}
        call_kwargs = {"train": train} if self._encoder_takes_train else {}
        mutable = ["batch_stats"] if train and stats else []
        if self.hidden_layer is None:
            out = encoder.apply(variables, x, mutable=mutable or False, **call_kwargs)
            y, updates = out if mutable else (out, {})
        else:
            path = self._resolve_hidden_path(x)
            y, updates = encoder.apply(
                variables,
                x,
                mutable=mutable + ["intermediates"],
                capture_intermediates=lambda mdl, method: (
                    method == "__call__" and mdl.scope is not None and tuple(mdl.scope.path) == path
                ),
                **call_kwargs,
            )
            captured = updates.pop("intermediates")
            for name in path:
                captured = captured[name]
            y = captured["__call__"][-1]  # the last call, as the seed's forward hook keeps
        y = y.reshape(y.shape[0], -1)
        return y, updates.get("batch_stats", stats)

    def _resolve_hidden_path(self, x) -> tuple[str, ...]:
        """The submodule path that ``hidden_layer`` names; a clear error if there is none."""
        if self._hidden_path is not None:
            return self._hidden_path
        call_kwargs = {"train": False} if self._encoder_takes_train else {}
        called: list[tuple[str, ...]] = []  # module paths in the order their calls return

        def record(module, method):
            if method == "__call__" and module.path not in called:
                called.append(tuple(module.path))
            return False

        jax.eval_shape(
            lambda x: self.encoder.init(
                jax.random.key(0), x, capture_intermediates=record, **call_kwargs
            ),
            jax.ShapeDtypeStruct(x.shape, x.dtype),
        )
        children = [path[0] for path in called if len(path) == 1]
        available = {"/".join(path) for path in called if path}
        layer = self.hidden_layer
        if isinstance(layer, int):
            if not -len(children) <= layer < len(children):
                raise ValueError(
                    f"hidden_layer={layer} is out of range: {type(self.encoder).__name__} calls "
                    f"{len(children)} direct submodules: {children}."
                )
            path = (children[layer],)
        else:
            path = tuple(p for p in layer.replace(".", "/").split("/") if p)
            if "/".join(path) not in available:
                raise ValueError(
                    f"hidden_layer={layer!r} is not a submodule of {type(self.encoder).__name__}. "
                    f"Submodules called in its forward pass: {sorted(available)}."
                )
        self._hidden_path = path
        return path

    def _project(self, modules, params, stats, x, train):
        """Encoder + projector: images -> (projection, representation, new stats)."""
        encoder, projector, _ = modules
        rep, enc_stats = self._represent(encoder, params["encoder"], stats.get("encoder"), x, train)
        proj, proj_stats = self._apply_mlp(
            projector, params["projector"], stats["projector"], rep, train
        )
        return proj, rep, {**stats, "encoder": enc_stats, "projector": proj_stats}

    @staticmethod
    def _apply_mlp(module, params, stats, x, train):
        variables = {"params": params, "batch_stats": stats}
        if not train:
            return module.apply(variables, x, train=False), stats
        y, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
        return y, updates["batch_stats"]

    # ---------------------------------------------------------------------------- init / step

    def init(self, key: jax.Array, sample_images: jax.Array, tx: optax.GradientTransformation):
        """A fresh state. sample_images: [N, H, W, C] as the encoder sees them (N >= 1);
        only their shape and dtype matter. The target starts as a copy of the online network."""
        sample = _check_images(sample_images, train=False)
        if sample.ndim == 5:
            sample = sample[0]
        if sample.dtype == jnp.uint8:
            sample = self.preprocess_fn(sample)
        enc_key, proj_key, pred_key = jax.random.split(key, 3)
        encoder, projector, predictor = self._modules(None)
        call_kwargs = {"train": False} if self._encoder_takes_train else {}
        enc_vars = encoder.init(enc_key, sample, **call_kwargs)
        rep, _ = self._represent(
            encoder, enc_vars["params"], enc_vars.get("batch_stats"), sample, False
        )
        proj_vars = projector.init(proj_key, rep, train=False)
        proj = projector.apply(proj_vars, rep, train=False)
        pred_vars = predictor.init(pred_key, proj, train=False)
        params = {
            "encoder": enc_vars["params"],
            "projector": proj_vars["params"],
            "predictor": pred_vars["params"],
        }
        if self.probe is not None:
            params["probe"] = self.probe.init(jax.random.fold_in(key, 3), rep)["params"]
        stats = {
            "encoder": enc_vars.get("batch_stats", {}),
            "projector": proj_vars["batch_stats"],
            "predictor": pred_vars["batch_stats"],
        }
        target_params = target_stats = None
        if self.use_momentum:
            target_params = {k: params[k] for k in ("encoder", "projector")}
            target_stats = {k: stats[k] for k in ("encoder", "projector")}
            target_params, target_stats = jax.tree.map(jnp.copy, (target_params, target_stats))
        return ByolState(
            step=jnp.zeros((), jnp.int32),
            online_params=params,
            online_batch_stats=stats,
            target_params=target_params,
            target_batch_stats=target_stats,
            opt_state=tx.init(params),
            tx=tx,
        )

    def train_step(self, state: ByolState, images: jax.Array, key: jax.Array, labels=None):
        """One BYOL step on this replica's images; pure, so jit/pmap/shard_map it.

        Args:
          state: the current ByolState.
          images: [N, H, W, C] from which both views are drawn, or [2, N, S, S, C] for views
            already cropped on the host. uint8 or float, as ``augment_fn`` expects.
          key: the step's PRNG key, the same on every replica (e.g. ``fold_in(key, step)``).
          labels: int [N] for the online probe (``num_classes``); -1 marks unlabelled rows.
        Returns:
          (new state, metrics): loss, tau, grad_norm, and learning_rate when the optimiser
          exposes it (``optax.inject_hyperparams``); ``skipped`` with skip_nonfinite_steps;
          ``probe_loss``, ``probe_top1`` and ``probe_count`` (labelled rows of the global
          batch) with the online probe.
        """
        axis = _bound_axis(self.axis_name)
        images = _check_images(
            images,
            train=True,
            channels=self.channels,
            replicas=1 if axis is None else jax.lax.axis_size(axis),
        )
        bn_axis = axis if self._sync(axis) else None
        self._check_encoder_can_sync(state, bn_axis)
        modules = self._modules(bn_axis)
        view1, view2 = self._views(images, key, axis)

        if self.num_classes is not None and labels is None:
            raise ValueError(f"the online probe (num_classes={self.num_classes}) needs labels.")
        (_, (online_stats, target_stats, parts)), grads = jax.value_and_grad(
            self._loss, has_aux=True
        )(state.online_params, state, view1, view2, modules, labels)
        loss = parts.pop("loss")
        if axis is not None:
            grads, loss = jax.lax.pmean((grads, loss), axis)
            parts = jax.lax.psum(parts, axis)
            if bn_axis is None:  # unsynced BatchNorm: keep one set of statistics on all replicas
                online_stats = jax.lax.pmean(online_stats, axis)
                if self.use_momentum:
                    target_stats = jax.lax.pmean(target_stats, axis)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.online_params)
        online_params = optax.apply_updates(state.online_params, updates)

        tau = jnp.asarray(self.tau(state.step), jnp.float32)
        new_state = state.replace(
            step=state.step + 1,
            online_params=online_params,
            online_batch_stats=online_stats,
            opt_state=opt_state,
        )
        if self.use_momentum:
            # The EMA reads the online parameters *after* the optimiser step (paper, seed).
            new_state = new_state.replace(
                target_params=target_update(online_params, state.target_params, tau),
                target_batch_stats=target_stats,
            )
        grad_norm = _global_norm(grads)
        param_norm = _global_norm(online_params)  # non-finite here: the update overflowed
        metrics = {"loss": loss, "tau": tau, "grad_norm": grad_norm, "param_norm": param_norm}
        if self.num_classes is not None:  # summed over replicas, so exact for the global batch
            count = jnp.maximum(parts["probe_count"], 1)
            metrics["probe_loss"] = parts["probe_loss_sum"] / count
            metrics["probe_top1"] = parts["probe_correct"] / count
            metrics["probe_count"] = parts["probe_count"]  # labelled rows: 0 means no signal
        # inject_hyperparams stores the value the update just used in the *new* state.
        learning_rate = getattr(opt_state, "hyperparams", {}).get("learning_rate")
        if learning_rate is not None:
            metrics["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
        if self.skip_nonfinite_steps:
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
            new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
            new_state = new_state.replace(step=state.step + 1)
            metrics["param_norm"] = _global_norm(new_state.online_params)  # of the kept state
            metrics["skipped"] = 1 - finite.astype(jnp.int32)
        return new_state, metrics

    def loss(self, state: ByolState, images: jax.Array, key: jax.Array, labels=None) -> jax.Array:
        """The loss a step differentiates (BYOL, plus the probe's with ``num_classes``), on
        this replica, for inspection and tests. No gradient reaches the target."""
        axis = _bound_axis(self.axis_name)
        modules = self._modules(axis if self._sync(axis) else None)
        view1, view2 = self._views(images, key, axis)
        return self._loss(state.online_params, state, view1, view2, modules, labels)[0]

    def _loss(self, online_params, state, view1, view2, modules, labels):
        """-> (total loss, (online stats, target stats, metrics)): BYOL's loss plus, with a
        probe, its cross-entropy on labelled rows (labels < 0 are unlabelled)."""
        targets = target_stats = None
        if self.use_momentum:
            # The target runs in training mode with its own BatchNorm statistics.
            _, targets, _, target_stats = self._forward_views(
                modules, state.target_params, state.target_batch_stats, view1, view2, predict=False
            )
        (p1, p2), (z1, z2), rep1, online_stats = self._forward_views(
            modules, online_params, state.online_batch_stats, view1, view2, predict=True
        )
        t1, t2 = targets if targets is not None else (z1, z2)  # SimSiam: the online projection
        # Stop-gradient: the target side never receives gradients (BYOL and SimSiam alike).
        t1, t2 = jax.lax.stop_gradient(t1), jax.lax.stop_gradient(t2)
        loss = jnp.mean(regression_loss(p1, t2) + regression_loss(p2, t1))
        metrics = {"loss": loss}
        total = loss
        if self.num_classes is not None:
            # The probe sees a stopped representation: it never changes the encoder's gradient.
            logits = self.probe.apply(
                {"params": online_params["probe"]}, jax.lax.stop_gradient(rep1)
            )
            probe_loss, probe_metrics = _probe_loss(logits, labels, _bound_axis(self.axis_name))
            total = total + probe_loss
            metrics.update(probe_metrics)
        return total, (online_stats, target_stats, metrics)

    def _sync(self, axis: str | None) -> bool:
        if axis is None:
            return False
        if self.sync_batchnorm is None:
            return jax.lax.axis_size(axis) > 1
        return bool(self.sync_batchnorm)

    def _check_encoder_can_sync(self, state: ByolState, bn_axis: str | None) -> None:
        """Cross-replica BatchNorm is asked for (sync_batchnorm, or None over several devices)
        but the encoder's BatchNorm layers have no axis to average over: an error, never a
        silent fall-back to per-device statistics."""
        if bn_axis is None or self._encoder_has_axis or jax.lax.axis_size(bn_axis) == 1:
            return
        if not jax.tree.leaves(state.online_batch_stats.get("encoder", {})):
            return  # no BatchNorm in the encoder: nothing to synchronise
        raise ValueError(
            f"{type(self.encoder).__name__} has BatchNorm statistics but no `axis_name` field, so "
            f"its BatchNorm cannot average over the {jax.lax.axis_size(bn_axis)} devices the step "
            f"runs on (sync_batchnorm={self.sync_batchnorm} asks for cross-replica BatchNorm). "
            "Add a field `axis_name: str | None = None` to the module and pass it to its "
            "BatchNorm layers, or pass sync_batchnorm=False to keep per-device statistics."
        )

    def _views(self, images, key, axis):
        """The two augmented views [N, S, S, C] of this replica's images."""
        key1, key2 = jax.random.split(key)
        if axis is not None:  # replicas draw different augmentations from the shared step key
            index = jax.lax.axis_index(axis)
            key1, key2 = jax.random.fold_in(key1, index), jax.random.fold_in(key2, index)
        first, second = (images[0], images[1]) if images.ndim == 5 else (images, images)
        views = self.augment_fn(key1, first), self.augment_fn2(key2, second)
        want = (first.shape[0], self.image_size, self.image_size, self.channels)
        for i, view in enumerate(views, 1):
            if tuple(view.shape) != want:
                raise ValueError(
                    f"augment_fn{'' if i == 1 else '2'} returned view {i} of shape "
                    f"{tuple(view.shape)}, expected {want} (image_size={self.image_size}): make the "
                    f"augmentation crop/resize to image_size, or set image_size to the input size."
                )
        return views

    def _forward_views(self, modules, params, stats, view1, view2, predict):
        """Both views through encoder + projector (+ predictor):
        ((out1, out2), (z1, z2), representation of view 1, stats)."""
        if self.views_in_one_batch:
            out, proj, rep, stats = self._forward(
                modules, params, stats, jnp.concatenate([view1, view2]), predict
            )
            n = view1.shape[0]
            return (out[:n], out[n:]), (proj[:n], proj[n:]), rep[:n], stats
        out1, proj1, rep1, stats = self._forward(modules, params, stats, view1, predict)
        out2, proj2, _, stats = self._forward(modules, params, stats, view2, predict)
        return (out1, out2), (proj1, proj2), rep1, stats

    def _forward(self, modules, params, stats, x, predict):
        proj, rep, stats = self._project(modules, params, stats, x, train=True)
        if not predict:
            return proj, proj, rep, stats
        pred, pred_stats = self._apply_mlp(
            modules[2], params["predictor"], stats["predictor"], proj, True
        )
        return pred, proj, rep, {**stats, "predictor": pred_stats}

    # -------------------------------------------------------------------------------- embed

    def embed(
        self,
        state: ByolState,
        images: jax.Array,
        return_projection: bool = False,
        use_target: bool = False,
        preprocess: bool = True,
    ):
        """The representation [N, D] of images [N, H, W, C], or (projection [N, P],
        representation [N, D]) with ``return_projection``; BatchNorm in inference mode.

        ``preprocess`` applies ``preprocess_fn`` (ImageNet normalisation by default); pass
        images as the encoder sees them with ``preprocess=False``. ``use_target`` embeds with
        the target network instead of the online one."""
        images = _check_images(images, train=False, channels=self.channels)
        if use_target and not self.use_momentum:
            raise ValueError("use_target=True needs a target network; SimSiam mode has none.")
        return self._embed_jit(state, images, return_projection, use_target, preprocess)

    @property
    def _embed_jit(self):
        if not hasattr(self, "_embed_compiled"):
            self._embed_compiled = jax.jit(self._embed, static_argnums=(2, 3, 4))
        return self._embed_compiled

    def _embed(self, state, images, return_projection, use_target, preprocess):
        x = self.preprocess_fn(images) if preprocess else images
        params = state.target_params if use_target else state.online_params
        stats = state.target_batch_stats if use_target else state.online_batch_stats
        modules = self._modules(None)
        if not return_projection:
            return self._represent(modules[0], params["encoder"], stats.get("encoder"), x, False)[0]
        proj, rep, _ = self._project(modules, params, stats, x, train=False)
        return proj, rep


def _bound_axis(name: str) -> str | None:
    """``name`` if the step runs under a pmap/shard_map that binds it, else None."""
    try:
        jax.lax.axis_size(name)
    except NameError:
        return None
    return name


def _check_images(images, *, train: bool, channels: int | None = None, replicas: int = 1):
    """Validate an image batch: [N, H, W, C] or [2, N, S, S, C]; a clear error otherwise."""
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        raise TypeError(f"images must be an array, got {type(images).__name__}.")
    if images.ndim not in (4, 5) or (images.ndim == 5 and images.shape[0] != 2):
        raise ValueError(
            f"images must be [N, H, W, C] (or [2, N, S, S, C] for two host-cropped views), got "
            f"shape {tuple(images.shape)}. Add a batch axis with images[None] for one image."
        )
    if channels is not None and images.shape[-1] != channels:
        raise ValueError(
            f"images have {images.shape[-1]} channels but the learner takes {channels}: images "
            f"must be channels-last [N, H, W, C]; repeat grayscale to RGB or set channels=."
        )
    batch = images.shape[-4] * replicas
    if train and batch < 2:
        raise ValueError(
            "training needs more than one image per batch (BatchNorm in the projector needs "
            f"batch statistics), got a global batch of {batch}."
        )
    return images


def _probe_loss(logits, labels, axis):
    """The probe's cross-entropy over the labelled rows of the *global* batch, and the sums
    the step reports. Replicas hold different numbers of labelled rows, so each divides its
    sum by the global count (times the replica count, which the gradient pmean divides out):
    the averaged gradient is that of the global mean, not a mean of per-replica means."""
    labelled = labels >= 0
    xent = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), jnp.where(labelled, labels, 0)
    )
    count = jnp.sum(labelled).astype(jnp.float32)
    loss_sum = jnp.sum(jnp.where(labelled, xent, 0.0))
    replicas, total = (1, count)
    if axis is not None:
        replicas, total = jax.lax.axis_size(axis), jax.lax.psum(count, axis)
    loss = replicas * loss_sum / jnp.maximum(total, 1.0)
    correct = jnp.sum(labelled & (jnp.argmax(logits, -1) == labels))
    sums = {
        "probe_loss_sum": loss_sum,
        "probe_correct": correct.astype(jnp.float32),
        "probe_count": count,
    }
    return loss, sums


# optax >= 0.2.5 has optax.tree.norm and deprecates optax.global_norm.
_global_norm = optax.tree.norm if hasattr(optax, "tree") else optax.global_norm
