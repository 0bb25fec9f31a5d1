"""BYOL: the learner, its state, the loss, the EMA target and the per-replica train step.

The train step is written once, per replica, with an axis name. Run it as it is on one
device, or map it with ``jax.pmap`` / ``jax.shard_map`` (see ``byol_jax.parallel``): when
the axis is bound, gradients are averaged over it and, with ``sync_batchnorm``, BatchNorm
statistics are computed over the whole global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from byol_jax import ema, encoders, image_ops, losses, networks, parallel

PyTree = Any
AugmentFn = Callable[[jax.Array, jax.Array], jax.Array]
DEFAULT_AXIS = "batch"


@struct.dataclass
class ByolState:
    """Everything a BYOL run changes, as one pytree.

    ``online_params`` holds ``encoder``, ``projector`` and ``predictor`` (and ``probe`` with
    the online probe); ``target_params`` holds ``encoder`` and ``projector`` only (the target
    has no predictor), or is None in SimSiam mode. BatchNorm statistics are kept apart from
    parameters: the EMA averages parameters only, and the target keeps statistics of its own.
    """

    step: jax.Array
    online_params: PyTree
    online_batch_stats: PyTree
    target_params: PyTree | None
    target_batch_stats: PyTree | None
    opt_state: optax.OptState
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


# What ``embed`` applies by default, and what the default views end with: uint8 or [0, 1]
# images -> float32 normalised with the ImageNet mean and std.
normalize_images = image_ops.normalize


class BYOL:
    """Bootstrap Your Own Latent around any Flax encoder.

    Args:
      encoder: a Flax Linen or NNX module mapping images [N, H, W, C] to features
        (``byol_jax.encoders`` says how each is driven: a Linen ``train`` argument, an
        ``axis_name`` field for cross-replica BatchNorm; NNX ``train()`` / ``eval()`` and
        ``nnx.BatchNorm``).
      image_size: the side of the (square) images the encoder sees after augmentation.
      hidden_layer: where the representation comes from. None (or -1) = the encoder's output;
        a str = the path of a submodule ('avgpool', 'stage4_block2', 'a/b'; NNX: attribute
        names and list indices, 'blocks.3'); an int = an index into the encoder's direct
        submodules (Linen: in call order; NNX: in assignment order), as the seed's
        ``hidden_layer=-2``. The chosen tensor is flattened to [N, D].
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
        _check_arguments(locals())
        self.encoder = encoder
        self._encoder = encoders.adapt(encoder, hidden_layer)
        self.image_size = image_size
        self.channels = channels
        self.hidden_layer = self._encoder.hidden_layer
        self.use_momentum = use_momentum
        self.sync_batchnorm = sync_batchnorm
        self.views_in_one_batch = views_in_one_batch
        self.skip_nonfinite_steps = skip_nonfinite_steps
        self.axis_name = axis_name
        tau = moving_average_decay
        self.tau = tau if callable(tau) else lambda _: tau
        if augment_fn is None:
            from byol_jax import augment  # noqa: PLC0415 (lazy: custom augment users skip it)

            augment_fn, augment_fn2 = augment.recipe("byol", image_size)
        self.augment_fn = augment_fn
        self.augment_fn2 = augment_fn2 or augment_fn
        self.preprocess_fn = preprocess_fn or normalize_images
        projector_cls = networks.MLP if use_momentum else networks.SimSiamMLP
        self.projector = projector_cls(projection_hidden_size, projection_size, dtype=dtype)
        self.predictor = networks.MLP(projection_hidden_size, projection_size, dtype=dtype)
        self.num_classes = num_classes
        self.probe = nn.Dense(num_classes, name="probe") if num_classes else None

    def check_hidden_layer(self, sample: jax.Array | jax.ShapeDtypeStruct) -> None:
        """Resolves ``hidden_layer`` by tracing the encoder on ``sample``'s shape only: a
        ValueError listing the submodules when it names none. Costs no compilation."""
        if self.hidden_layer is not None:
            self._encoder.hidden_path(sample)

    # ----------------------------------------------------------------------------- networks

    def _project(self, params, stats, x, train, bn_axis=None):
        """Encoder + projector: images -> (projection, representation, new stats)."""
        rep, enc_stats = self._encoder.represent(
            params["encoder"], stats.get("encoder"), x, train=train, axis_name=bn_axis
        )
        proj, proj_stats = _apply_mlp(
            self.projector.clone(axis_name=bn_axis),
            params["projector"],
            stats["projector"],
            rep,
            train,
        )
        return proj, rep, {**stats, "encoder": enc_stats, "projector": proj_stats}

    def _forward(self, params, stats, x, predict, bn_axis):
        """Training-mode forward of one batch: (prediction or projection, projection,
        representation, new stats)."""
        proj, rep, stats = self._project(params, stats, x, True, bn_axis)
        if not predict:
            return proj, proj, rep, stats
        predictor = self.predictor.clone(axis_name=bn_axis)
        pred, pred_stats = _apply_mlp(
            predictor, params["predictor"], stats["predictor"], proj, True
        )
        return pred, proj, rep, {**stats, "predictor": pred_stats}

    def _forward_views(self, params, stats, view1, view2, predict, bn_axis):
        """Both views through encoder + projector (+ predictor):
        ((out1, out2), (z1, z2), representation of view 1, stats)."""
        if self.views_in_one_batch:  # one BatchNorm batch of both views (the seed)
            both = jnp.concatenate([view1, view2])
            out, proj, rep, stats = self._forward(params, stats, both, predict, bn_axis)
            n = view1.shape[0]
            return (out[:n], out[n:]), (proj[:n], proj[n:]), rep[:n], stats
        # The paper: each view normalised by its own batch statistics; the running statistics
        # take the first view's update, then the second's.
        out1, proj1, rep1, stats = self._forward(params, stats, view1, predict, bn_axis)
        out2, proj2, _, stats = self._forward(params, stats, view2, predict, bn_axis)
        return (out1, out2), (proj1, proj2), rep1, stats

    # ---------------------------------------------------------------------------- init / step

    def init(self, key: jax.Array, sample_images: jax.Array, tx: optax.GradientTransformation):
        """A fresh state. sample_images: [N, H, W, C] as the encoder sees them (N >= 1);
        only their shape and dtype matter. The target starts as a copy of the online network."""
        sample = _check_images(sample_images, train=False)
        sample = sample[0] if sample.ndim == 5 else sample
        sample = self.preprocess_fn(sample) if sample.dtype == jnp.uint8 else sample
        enc_key = jax.random.split(key, 3)[0]
        enc_params, enc_stats = self._encoder.init(enc_key, sample)
        rep = jax.eval_shape(
            lambda p, s: self._encoder.represent(p, s, sample, train=False)[0],
            enc_params,
            enc_stats,
        )
        params, stats = self.init_heads(key, rep.shape[-1])
        params, stats = {"encoder": enc_params, **params}, {"encoder": enc_stats, **stats}
        target_params = target_stats = None
        if self.use_momentum:  # the target starts as a copy of the online encoder + projector
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

    def init_heads(self, key: jax.Array, representation_size: int) -> tuple[dict, dict]:
        """Fresh projector, predictor (and probe) on a representation of that size:
        ({'projector', 'predictor'[, 'probe']} params, their BatchNorm statistics), drawn from
        ``key`` as ``init`` draws them (the encoder takes the first of its three splits)."""
        _, proj_key, pred_key = jax.random.split(key, 3)
        probe_key = jax.random.fold_in(key, 3)
        rep = jnp.zeros((1, representation_size), jnp.float32)
        proj_vars = self.projector.init(proj_key, rep, train=False)
        proj = jnp.zeros((1, self.projector.output_size), jnp.float32)
        pred_vars = self.predictor.init(pred_key, proj, train=False)
        params = {"projector": proj_vars["params"], "predictor": pred_vars["params"]}
        if self.probe is not None:
            params["probe"] = self.probe.init(probe_key, rep)["params"]
        stats = {"projector": proj_vars["batch_stats"], "predictor": pred_vars["batch_stats"]}
        return params, stats

    def train_step(self, state: ByolState, images: jax.Array, key: jax.Array, labels=None):
        """One BYOL step on this replica's images; pure, so jit/pmap/shard_map it.

        Args:
          state: the current ByolState.
          images: [N, H, W, C] from which both views are drawn, or [2, N, S, S, C] for views
            already cropped on the host. uint8 or float, as ``augment_fn`` expects.
          key: the step's PRNG key, the same on every replica (e.g. ``fold_in(key, step)``).
          labels: int [N] for the online probe (``num_classes``); -1 marks unlabelled rows.
        Returns:
          (new state, metrics): loss, tau, grad_norm, param_norm, and learning_rate when the
          optimiser exposes it (``optax.inject_hyperparams``); ``skipped`` with
          skip_nonfinite_steps; ``probe_loss``, ``probe_top1`` and ``probe_count`` (labelled
          rows of the global batch) with the online probe.
        """
        axis = parallel.bound_axis(self.axis_name)
        replicas = 1 if axis is None else jax.lax.axis_size(axis)
        images = _check_images(images, train=True, channels=self.channels, replicas=replicas)
        if self.num_classes is not None and labels is None:
            raise ValueError(f"the online probe (num_classes={self.num_classes}) needs labels.")
        bn_axis = self._bn_axis(state, axis)
        with jax.named_scope("views"):  # scopes name the step's parts in profiles (no effect)
            view1, view2 = self._views(images, key, axis)
        (_, (online_stats, target_stats, parts)), grads = jax.value_and_grad(
            self._loss, has_aux=True
        )(state.online_params, state, view1, view2, labels, bn_axis)
        if axis is not None:
            grads, parts["loss"] = jax.lax.pmean((grads, parts["loss"]), axis)
            parts.update(jax.lax.psum({k: v for k, v in parts.items() if k != "loss"}, axis))
            if bn_axis is None:  # unsynced BatchNorm: keep one set of statistics on all replicas
                online_stats, target_stats = jax.lax.pmean((online_stats, target_stats), axis)
        with jax.named_scope("update"):
            new_state, metrics = self._apply_gradients(state, grads, online_stats, target_stats)
        metrics.update(_step_metrics(parts, grads))
        if self.skip_nonfinite_steps:
            new_state, metrics = _keep_if_finite(state, new_state, metrics)
        return new_state, metrics

    def _apply_gradients(self, state, grads, online_stats, target_stats):
        """The optimiser step on the online network, then the EMA target."""
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
            with jax.named_scope("ema"):
                target = ema.target_update(online_params, state.target_params, tau)
            new_state = new_state.replace(
                target_params=target,
                target_batch_stats=target_stats,
            )
        metrics = {"tau": tau, "param_norm": optax.tree.norm(online_params)}
        # inject_hyperparams stores the value the update just used in the *new* state.
        learning_rate = getattr(opt_state, "hyperparams", {}).get("learning_rate")
        if learning_rate is not None:
            metrics["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
        return new_state, metrics

    def loss(self, state: ByolState, images: jax.Array, key: jax.Array, labels=None) -> jax.Array:
        """The loss a step differentiates (BYOL, plus the probe's with ``num_classes``), on
        this replica, for inspection and tests. No gradient reaches the target."""
        axis = parallel.bound_axis(self.axis_name)
        view1, view2 = self._views(images, key, axis)
        bn_axis = self._bn_axis(state, axis)
        return self._loss(state.online_params, state, view1, view2, labels, bn_axis)[0]

    def _loss(self, online_params, state, view1, view2, labels, bn_axis):
        """-> (total loss, (online stats, target stats, metrics)): BYOL's loss plus, with a
        probe, its cross-entropy on labelled rows (labels < 0 are unlabelled)."""
        targets = target_stats = None
        if self.use_momentum:
            # The target runs in training mode with its own parameters and BatchNorm statistics.
            with jax.named_scope("target"):
                _, targets, _, target_stats = self._forward_views(
                    state.target_params, state.target_batch_stats, view1, view2, False, bn_axis
                )
        with jax.named_scope("online"):
            (p1, p2), (z1, z2), rep1, online_stats = self._forward_views(
                online_params, state.online_batch_stats, view1, view2, True, bn_axis
            )
        t1, t2 = targets if targets is not None else (z1, z2)  # SimSiam: the online projection
        # Stop-gradient: the target side never receives gradients (BYOL and SimSiam alike).
        t1, t2 = jax.lax.stop_gradient(t1), jax.lax.stop_gradient(t2)
        loss = jnp.mean(losses.regression_loss(p1, t2) + losses.regression_loss(p2, t1))
        metrics, total = {"loss": loss}, loss
        if self.num_classes is not None:
            # The probe sees a stopped representation: it never changes the encoder's gradient.
            rep1 = jax.lax.stop_gradient(rep1)
            with jax.named_scope("probe"):
                logits = self.probe.apply({"params": online_params["probe"]}, rep1)
                axis = parallel.bound_axis(self.axis_name)
                probe_loss, probe_sums = losses.probe_loss(logits, labels, axis)
            total = total + probe_loss
            metrics.update(probe_sums)
        return total, (online_stats, target_stats, metrics)

    def _bn_axis(self, state: ByolState, axis: str | None) -> str | None:
        """The axis BatchNorm averages over: the device axis when syncing (sync_batchnorm, or
        None over several devices), else None (per-device statistics)."""
        if axis is None:
            return None
        sync = jax.lax.axis_size(axis) > 1 if self.sync_batchnorm is None else self.sync_batchnorm
        if not sync:
            return None
        self._check_encoder_can_sync(state, axis)
        return axis

    def _check_encoder_can_sync(self, state: ByolState, axis: str) -> None:
        """Cross-replica BatchNorm is asked for but the encoder's BatchNorm layers have no axis
        to average over: an error, never a silent fall-back to per-device statistics."""
        if self._encoder.can_sync or jax.lax.axis_size(axis) == 1:
            return
        if not jax.tree.leaves(state.online_batch_stats.get("encoder", {})):
            return  # no BatchNorm in the encoder: nothing to synchronise
        raise ValueError(
            f"{self._encoder.name} cannot average its BatchNorm statistics over the "
            f"{jax.lax.axis_size(axis)} devices the step runs on (sync_batchnorm="
            f"{self.sync_batchnorm} asks for cross-replica BatchNorm): it "
            f"{self._encoder.cannot_sync}, or pass sync_batchnorm=False to keep per-device "
            "statistics."
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
        if not return_projection:
            encoder_stats = stats.get("encoder")
            return self._encoder.represent(params["encoder"], encoder_stats, x, train=False)[0]
        proj, rep, _ = self._project(params, stats, x, train=False)
        return proj, rep


def _check_arguments(args: dict) -> None:
    """Clear errors for BYOL's constructor arguments."""
    for name in ("image_size", "projection_size", "projection_hidden_size", "channels"):
        value = args[name]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    layer = args["hidden_layer"]
    if layer is not None and not isinstance(layer, str | int):
        raise TypeError(f"hidden_layer must be None, a str or an int, got {layer!r}.")
    if not callable(args["moving_average_decay"]):
        ema.check_tau(args["moving_average_decay"])
    if args["augment_fn"] is None and args["augment_fn2"] is not None:
        raise ValueError("augment_fn2 was given without augment_fn: give both or only the first.")
    classes = args["num_classes"]
    if classes is not None and (not isinstance(classes, int) or classes < 2):
        raise ValueError(f"num_classes must be an int >= 2 for the probe, got {classes!r}.")


def _apply_mlp(module, params, stats, x, train):
    variables = {"params": params, "batch_stats": stats}
    if not train:
        return module.apply(variables, x, train=False), stats
    y, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
    return y, updates["batch_stats"]


def _step_metrics(parts: dict, grads) -> dict:
    """The step's loss and gradient norm, and the probe's exact global figures (its sums are
    over all replicas' labelled rows)."""
    metrics = {"loss": parts["loss"], "grad_norm": optax.tree.norm(grads)}
    if "probe_count" in parts:
        count = jnp.maximum(parts["probe_count"], 1)
        metrics["probe_loss"] = parts["probe_loss_sum"] / count
        metrics["probe_top1"] = parts["probe_correct"] / count
        metrics["probe_count"] = parts["probe_count"]  # labelled rows: 0 means no signal
    return metrics


def _keep_if_finite(old: ByolState, new: ByolState, metrics: dict):
    """skip_nonfinite_steps: a step with a non-finite loss, gradient or update keeps the old
    state (but counts the step) and reports ``skipped = 1``."""
    finite = (
        jnp.isfinite(metrics["loss"])
        & jnp.isfinite(metrics["grad_norm"])
        & jnp.isfinite(metrics["param_norm"])
    )
    kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old).replace(step=old.step + 1)
    metrics = {**metrics, "param_norm": optax.tree.norm(kept.online_params)}  # the kept state's
    return kept, {**metrics, "skipped": 1 - finite.astype(jnp.int32)}


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
