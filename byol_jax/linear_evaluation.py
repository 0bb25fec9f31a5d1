"""Linear evaluation of a pre-trained BYOL encoder: ``train_and_evaluate(config, workdir)``.

The paper's protocol (docs/evaluation.md#linear-evaluation): the encoder of a pre-training run is frozen
(BatchNorm in inference mode, stop-gradient), one linear layer on its representation is trained
with SGD (Nesterov momentum 0.9, lr 0.2 x batch/256, cosine decay to 0, 80 epochs, no weight
decay) on random-resized crops with flips, and top-1/top-5 are measured on centre crops.

Two levels share one classifier step:

* features: ``train_linear_classifier(features, labels, num_classes)`` and
  ``evaluate_linear(state, features, labels)`` on precomputed representations (the protocol
  without augmentation), for notebooks and tests;
* images: ``train_and_evaluate`` runs the encoder forward inside the mapped step (pmap or
  shard_map over all devices, gradients averaged), with its own checkpoints in ``workdir``,
  exact resume, SIGTERM preemption, metrics, and ``workdir/results.json`` at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from ml_collections import config_dict

from byol_jax import (
    byol,
    checkpoint,
    evaluate,
    input_pipeline,
    monitor,
    optim,
    parallel,
    pretrained,
    training,
)

log = logging.getLogger(__name__)
PyTree = Any
RESULTS_FILE = "results.json"
TOP_K = (1, 5)


# ------------------------------------------------------------------------------ config


def default_config() -> ml_collections.ConfigDict:
    """The linear-evaluation settings every file in configs/linear_eval/ starts from."""
    config = ml_collections.ConfigDict()
    config.pretrained_workdir = ""  # the workdir of a byol_jax.train run (required)
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
    """One typed placeholder per field of ``input_pipeline.default_data_config``."""
    overrides = ml_collections.ConfigDict()
    for name, value in input_pipeline.default_data_config().items():
        overrides[name] = config_dict.placeholder(type(value))
    return overrides


def merged_data(
    pretraining: ml_collections.ConfigDict, overrides: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
    """The pre-training run's ``config.data`` with the fields the linear config sets."""
    data = input_pipeline.default_data_config()
    data.update(pretraining.data.to_dict())
    data.update({k: v for k, v in overrides.to_dict().items() if v is not None})
    return data


# -------------------------------------------------------------------- the linear classifier


@struct.dataclass
class ClassifierState:
    """The linear layer on the frozen representation: params {'kernel': [D, C], 'bias': [C]}."""

    step: jax.Array
    params: PyTree
    opt_state: optax.OptState
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


def linear_optimizer(
    *,
    batch_size: int,
    total_steps: int,
    base_learning_rate: float = 0.2,
    reference_batch_size: int = 256,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum, lr ``base x batch / reference`` decayed by a cosine to 0."""
    schedule = optim.learning_rate_schedule(
        base_learning_rate,
        batch_size=batch_size,
        total_steps=total_steps,
        schedule="cosine",
        reference_batch_size=reference_batch_size or None,
    )
    return optim.create_optimizer(
        "sgd", schedule, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov
    )


def init_classifier(
    feature_dim: int, num_classes: int, tx: optax.GradientTransformation
) -> ClassifierState:
    """A zero-initialised linear layer (deterministic: nothing to draw, nothing to resume)."""
    params = {
        "kernel": jnp.zeros((feature_dim, num_classes), jnp.float32),
        "bias": jnp.zeros((num_classes,), jnp.float32),
    }
    return ClassifierState(jnp.zeros((), jnp.int32), params, tx.init(params), tx)


def classifier_logits(params: PyTree, features: jax.Array) -> jax.Array:
    """features [N, D] -> logits [N, C], in float32."""
    return nn.Dense(params["bias"].shape[0]).apply({"params": params}, features.astype(jnp.float32))


def classifier_step(
    state: ClassifierState, features: jax.Array, labels: jax.Array, axis_name: str | None = None
) -> tuple[ClassifierState, dict]:
    """One SGD step of the classifier on this replica's features [N, D] and labels int [N]
    (rows with label -1 are ignored). Under a mapped ``axis_name``, gradients are averaged over
    it and the metrics (loss, top1 of the batch, learning_rate) are exact global figures."""
    axis = _bound_axis(axis_name)
    # The representation is frozen: no gradient reaches the encoder.
    features = jax.lax.stop_gradient(features)
    labelled = labels >= 0

    def loss_sum(params):
        logits = classifier_logits(params, features)
        xent = optax.softmax_cross_entropy_with_integer_labels(
            logits, jnp.where(labelled, labels, 0)
        )
        return jnp.sum(jnp.where(labelled, xent, 0.0)), logits

    (total, logits), grads = jax.value_and_grad(loss_sum, has_aux=True)(state.params)
    sums = {
        "loss": total,
        "correct": jnp.sum(labelled & (jnp.argmax(logits, -1) == labels)).astype(jnp.float32),
        "count": jnp.sum(labelled).astype(jnp.float32),
    }
    if axis is not None:
        grads, sums = jax.lax.psum((grads, sums), axis)
    count = jnp.maximum(sums["count"], 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)  # the gradient of the global mean loss
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )
    metrics = {"loss": sums["loss"] / count, "top1": sums["correct"] / count}
    learning_rate = getattr(opt_state, "hyperparams", {}).get("learning_rate")
    if learning_rate is not None:
        metrics["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
    return new_state, metrics


def correct_counts(
    params: PyTree, features: jax.Array, labels: jax.Array, axis_name: str | None = None
) -> dict:
    """{'top1': hits, 'top5': hits, 'count': labelled rows}, summed over ``axis_name`` when
    mapped; rows with label -1 (padding) are not counted."""
    logits = classifier_logits(params, features)
    labelled = labels >= 0
    counts = {"count": jnp.sum(labelled).astype(jnp.float32)}
    for k in TOP_K:
        if k <= logits.shape[-1]:
            _, top = jax.lax.top_k(logits, k)
            hit = jnp.any(top == labels[:, None], axis=-1) & labelled
            counts[f"top{k}"] = jnp.sum(hit).astype(jnp.float32)
    axis = _bound_axis(axis_name)
    return counts if axis is None else jax.lax.psum(counts, axis)


def _bound_axis(name: str | None) -> str | None:
    if name is None:
        return None
    try:
        jax.lax.axis_size(name)
    except NameError:
        return None
    return name


# --------------------------------------------------------------------- features level


def train_linear_classifier(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    num_classes: int,
    *,
    batch_size: int = 256,
    num_epochs: int = 80,
    total_steps: int = -1,
    base_learning_rate: float = 0.2,
    reference_batch_size: int = 256,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> ClassifierState:
    """The linear protocol on precomputed features [N, D] with int labels [N].

    Batches of ``batch_size`` rows; epoch e visits the rows in the order
    ``default_rng([seed, e]).permutation(N)``. ``total_steps > 0`` overrides ``num_epochs``.
    Returns the trained ClassifierState (``evaluate_linear`` scores it).
    """
    features = np.asarray(train_features, np.float32)
    labels = np.asarray(train_labels, np.int32)
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(
            f"train_features must be [N, D] and train_labels [N], got {features.shape} and "
            f"{labels.shape}."
        )
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"train_labels must be in [0, num_classes={num_classes}).")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    steps_per_epoch = max(1, len(labels) // batch_size)
    steps = total_steps if total_steps > 0 else num_epochs * steps_per_epoch
    if steps <= 0:
        raise ValueError("set num_epochs or total_steps to a positive number.")
    tx = linear_optimizer(
        batch_size=batch_size,
        total_steps=steps,
        base_learning_rate=base_learning_rate,
        reference_batch_size=reference_batch_size,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
    )
    state = init_classifier(features.shape[1], num_classes, tx)
    step_fn = jax.jit(classifier_step, donate_argnums=0)
    for step in range(steps):
        rows = _batch_rows(seed, step, batch_size, len(labels))
        state, _ = step_fn(state, features[rows], labels[rows])
    return state


def _batch_rows(seed: int, step: int, batch_size: int, num_examples: int) -> np.ndarray:
    """Rows of batch `step`: stream positions step*B .. step*B+B-1, epoch by epoch permuted."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = np.divmod(positions, num_examples)
    rows = np.empty_like(positions)
    for epoch in np.unique(epochs):
        order = np.random.default_rng([seed, int(epoch)]).permutation(num_examples)
        rows[epochs == epoch] = order[offsets[epochs == epoch]]
    return rows


def evaluate_linear(
    state: ClassifierState | PyTree, features: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
    """{'top1', 'top5'} of the classifier (a ClassifierState or its params) on features [N, D]
    and labels [N]."""
    params = state.params if isinstance(state, ClassifierState) else state
    logits = jax.jit(classifier_logits)(params, jnp.asarray(features, jnp.float32))
    return evaluate.top_k_accuracy(np.asarray(logits), np.asarray(labels), TOP_K)


# ----------------------------------------------------------------------- image program


@struct.dataclass
class LinearEvalState:
    """What the mapped step carries: the trainable classifier and the frozen encoder (a
    ByolState slimmed to the online encoder). Checkpoints hold the classifier only."""

    classifier: ClassifierState
    encoder: byol.ByolState


@dataclasses.dataclass
class Run:
    """What ``setup`` derives: the pieces of one linear-evaluation run."""

    config: ml_collections.ConfigDict
    data: ml_collections.ConfigDict
    image_size: int
    learner: byol.BYOL
    encoder: byol.ByolState
    pretrained_step: int
    num_classes: int
    feature_dim: int
    tx: optax.GradientTransformation
    replicas: parallel.Replicas
    total_steps: int
    steps_per_epoch: int


def setup(config: ml_collections.ConfigDict, workdir: str, arrays: Mapping | None = None) -> Run:
    """Validate the config, load the pre-trained encoder and derive the run; every user error
    surfaces here, before any compilation."""
    _check_config(config)
    source = config.pretrained_workdir
    if os.path.realpath(source) == os.path.realpath(workdir):
        raise ValueError(
            f"--workdir {workdir} is the pre-training workdir: linear evaluation writes "
            "checkpoints of its own, pass another --workdir."
        )
    training.check_workdir(workdir)
    pretraining, _ = _load_pretrained_config(source)
    data = merged_data(pretraining, config.data)
    image_size = config.image_size or pretraining.image_size
    replicas = parallel.Replicas(config.parallel, byol.DEFAULT_AXIS)
    replicas.check_batch_size(config.batch_size)
    if config.eval_batch_size % replicas.num_local:
        raise ValueError(
            f"eval_batch_size={config.eval_batch_size} does not split over this process's "
            f"{replicas.num_local} devices: use a multiple of {replicas.num_local}."
        )
    train_split = input_pipeline.probe_split(data)
    num_classes = input_pipeline.require_labels(data, train_split, arrays)
    for split in filter(None, (data.eval_split, config.holdout_split)):
        input_pipeline.require_labels(data, split, arrays)
    info = input_pipeline.dataset_info(data, arrays)
    num_train = split_size(info["num_examples"], train_split)
    steps_per_epoch = max(1, num_train // config.batch_size)
    total_steps = (
        config.total_steps if config.total_steps > 0 else config.num_epochs * steps_per_epoch
    )
    learner, state, pretrained_step = _load_pretrained(source)
    encoder = _frozen_encoder(state)
    sample = np.zeros((1, image_size, image_size, 3), np.uint8)
    feature_dim = jax.eval_shape(learner.embed, encoder, sample).shape[-1]
    tx = linear_optimizer(
        batch_size=config.batch_size,
        total_steps=total_steps,
        base_learning_rate=config.base_learning_rate,
        reference_batch_size=config.reference_batch_size,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )
    return Run(
        config,
        data,
        image_size,
        learner,
        encoder,
        pretrained_step,
        num_classes,
        feature_dim,
        tx,
        replicas,
        total_steps,
        steps_per_epoch,
    )


def _check_config(config: ml_collections.ConfigDict) -> None:
    if not config.pretrained_workdir:
        raise ValueError("set --config.pretrained_workdir to the workdir of a byol_jax.train run.")
    positive = ("batch_size", "log_every", "checkpoint_every", "keep_checkpoints")
    for name in (*positive, "eval_batch_size"):
        if config[name] <= 0:
            raise ValueError(f"config.{name} must be positive, got {config[name]}.")
    if config.total_steps <= 0 and config.num_epochs <= 0:
        raise ValueError("set config.total_steps or config.num_epochs to a positive number.")
    if config.base_learning_rate <= 0:
        raise ValueError(f"config.base_learning_rate must be positive: {config.base_learning_rate}")
    if config.image_size is not None and config.image_size <= 0:
        raise ValueError(f"config.image_size must be positive, got {config.image_size}.")


def _load_pretrained_config(workdir: str):
    try:
        return pretrained.load_config(workdir)
    except checkpoint.CheckpointError as error:
        raise ValueError(f"config.pretrained_workdir={workdir!r}: {error}") from error


def _load_pretrained(workdir: str) -> tuple[byol.BYOL, byol.ByolState, int]:
    """(learner, state, step) of the pre-training run; a ValueError naming the workdir when
    it has no readable checkpoint or its config.json describes another architecture."""
    try:
        learner, state = pretrained.load(workdir)
    except checkpoint.CheckpointError as error:
        raise ValueError(
            f"cannot load the pre-trained encoder of config.pretrained_workdir={workdir!r}: {error}"
        ) from error
    return learner, state, int(state.step)


def _frozen_encoder(state: byol.ByolState) -> byol.ByolState:
    """The online encoder alone: what ``learner.embed`` reads (no target, head or optimiser)."""
    return state.replace(
        online_params={"encoder": state.online_params["encoder"]},
        online_batch_stats={"encoder": state.online_batch_stats.get("encoder", {})},
        target_params=None,
        target_batch_stats=None,
        opt_state=None,
    )


_SLICE = re.compile(r"^(?P<name>[^\[\]]+)\[(?P<start>-?\d*%?):(?P<stop>-?\d*%?)\]$")


def split_size(counts: Mapping[str, int], split: str) -> int:
    """Examples in ``split``: a split name, or a TFDS slice of one with example or percent
    bounds, e.g. 'train[10000:]', 'train[:10%]' (percent bounds rounded to the nearest
    example, as TFDS does by default)."""
    if split in counts:
        return _nonempty(counts[split], split, counts)
    match = _SLICE.match(split)
    if match is None or match["name"] not in counts:
        raise ValueError(f"split {split!r} is not in the data; it has {dict(counts)}.")
    n = counts[match["name"]]

    def bound(text, default):
        if not text:
            return default
        value = round(n * int(text[:-1]) / 100) if text.endswith("%") else int(text)
        return min(max(value + n if value < 0 else value, 0), n)

    start, stop = bound(match["start"], 0), bound(match["stop"], n)
    return _nonempty(max(stop - start, 0), split, counts)


def _nonempty(size: int, split: str, counts) -> int:
    if size <= 0:
        raise ValueError(f"split {split!r} is empty; the data has {dict(counts)}.")
    return size


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, arrays: Mapping | None = None
) -> dict:
    """Train the linear classifier on the frozen pre-trained encoder and score it; resumes
    from ``workdir``'s checkpoints. Returns {'steps', 'top1', 'top5'[, 'holdout_top1',
    'holdout_top5'], ...}, also written to ``workdir/results.json``."""
    if config.distributed:
        parallel.initialize_distributed(
            config.coordinator_address or None,
            config.num_processes or None,
            None if config.process_id < 0 else config.process_id,
        )
    run = setup(config, workdir, arrays)
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints
    )
    classifier = jax.device_get(init_classifier(run.feature_dim, run.num_classes, run.tx))
    restored = ckpt.restore_latest(classifier)
    start_step = 0
    if restored is not None:
        classifier, start_step = restored
        log.info("Resuming linear evaluation from step %d in %s.", start_step, workdir)
    checkpoint.save_config(workdir, {**config.to_dict(), "data": run.data.to_dict()})
    writer = monitor.MetricWriter(
        workdir,
        total_steps=run.total_steps,
        start_step=start_step,
        progress_bar=config.progress_bar,
    )
    try:
        with training.preemption_signal() as preempted:
            state = LinearEvalState(classifier, run.encoder)
            rstate = _train_loop(run, state, start_step, ckpt, writer, preempted, arrays)
        results = _final_evaluation(run, rstate, arrays)
        writer.write(
            run.total_steps,
            {k if k.startswith("holdout") else f"test_{k}": v for k, v in results.items()},
        )
        results = {"steps": run.total_steps, **results, **_provenance(run)}
        if jax.process_index() == 0:
            with open(os.path.join(workdir, RESULTS_FILE), "w") as f:
                json.dump(results, f, indent=2)
        return results
    finally:
        writer.close()
        ckpt.close()


def _provenance(run: Run) -> dict:
    return {
        "eval_split": run.data.eval_split,
        "train_split": input_pipeline.probe_split(run.data),
        "pretrained_workdir": os.path.abspath(run.config.pretrained_workdir),
        "pretrained_step": run.pretrained_step,
    }


def _image_step(learner: byol.BYOL):
    """The per-replica step: frozen encoder forward (inference mode), then the classifier."""

    def step(state: LinearEvalState, images, key, labels):
        del key  # the augmentation is done on the host, keyed by (seed, step)
        representation = learner.embed(state.encoder, images)
        classifier, metrics = classifier_step(
            state.classifier, representation, labels, learner.axis_name
        )
        return state.replace(classifier=classifier), metrics

    return step


def _should_stop(preempted: list[bool], step: int) -> bool:
    return training.should_stop(preempted, step)


def _train_loop(run, state, start_step, ckpt, writer, preempted, arrays):
    """-> the state in device form after ``run.total_steps`` steps."""
    config, replicas = run.config, run.replicas
    batches = input_pipeline.linear_eval_batches(
        run.data,
        global_batch_size=config.batch_size,
        image_size=run.image_size,
        seed=config.seed,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        arrays=arrays,
    )
    step_fn = replicas.map(_image_step(run.learner))
    rstate = replicas.replicate(state)
    if start_step >= run.total_steps:
        return rstate
    device_batches = parallel.prefetch_to_device(
        ({k: b[k] for k in ("images", "labels")} for b in batches), replicas
    )
    step_key = jax.random.key(config.seed)
    pending: list[tuple[int, Any]] = []
    throughput = monitor.Throughput(config.batch_size)
    last_logged = start_step
    for step in range(start_step, run.total_steps):
        batch = next(device_batches)
        key = jax.random.fold_in(step_key, step)
        rstate, metrics = step_fn(rstate, batch["images"], key, batch["labels"])
        pending.append((step, metrics))
        done = step + 1
        writer.advance()
        stop = _should_stop(preempted, done)
        if done % config.log_every == 0 or done == run.total_steps or stop:
            rows = [_finite(step, replicas.fetch(m)) for step, m in pending]
            pending = []
            summary = {k: float(np.mean([r[k] for r in rows])) for k in rows[-1]}
            summary["images_per_s"] = throughput(done - last_logged)
            last_logged = done
            writer.write(done, summary)
        if done % config.checkpoint_every == 0 or done == run.total_steps or stop:
            classifier = jax.device_get(replicas.unreplicate(rstate.classifier))
            ckpt.save(done, classifier, force=stop)
        if stop:
            ckpt.wait_until_finished()
            log.warning(
                "Preempted: saved the checkpoint of step %d; exiting with %d.",
                done,
                training.PREEMPTED_EXIT_CODE,
            )
            raise training.Preempted()
    ckpt.wait_until_finished()
    return rstate


def _finite(step: int, row: dict) -> dict:
    if not math.isfinite(row["loss"]):
        raise training.NonFiniteLossError(
            f"the linear classifier's loss is {row['loss']} at step {step + 1}: lower "
            "base_learning_rate or check the pre-trained encoder's features."
        )
    return row


def _final_evaluation(run: Run, rstate, arrays) -> dict[str, float]:
    """top1/top5 on data.eval_split, and holdout_top1/top5 on config.holdout_split."""
    results = _score(run, rstate, run.data.eval_split, arrays)
    if run.config.holdout_split:
        holdout = _score(run, rstate, run.config.holdout_split, arrays)
        results.update({f"holdout_{k}": v for k, v in holdout.items()})
    return results


def _score(run: Run, rstate, split: str, arrays) -> dict[str, float]:
    """Top-k accuracy of the classifier on centre crops of ``split``, over all devices."""
    learner = run.learner

    def eval_step(state: LinearEvalState, images, key, labels):
        del key
        representation = learner.embed(state.encoder, images)
        return None, correct_counts(
            state.classifier.params, representation, labels, learner.axis_name
        )

    step_fn = run.replicas.map(eval_step, donate_state=False)
    batches = input_pipeline.eval_batches(
        run.data,
        split=split,
        batch_size=run.config.eval_batch_size,
        image_size=run.image_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        arrays=arrays,
    )
    totals: dict[str, float] = {}
    key = jax.random.key(0)
    for batch in batches:
        # Padding rows (mask False) get label -1: they are not counted.
        labels = np.where(batch["mask"], batch["labels"], -1).astype(np.int32)
        _, counts = step_fn(
            rstate, run.replicas.shard(batch["images"]), key, run.replicas.shard(labels)
        )
        for k, v in run.replicas.fetch(counts).items():
            totals[k] = totals.get(k, 0.0) + v
    count = max(totals.pop("count", 0.0), 1.0)
    return {k: v / count for k, v in sorted(totals.items())}


def format_results(results: dict) -> str:
    """The closing lines a run prints."""
    lines = [
        f"Linear evaluation finished after {results['steps']} steps "
        f"(encoder of {results['pretrained_workdir']}, step {results['pretrained_step']}).",
        f"{results['eval_split']}: top-1 {100 * results['top1']:.2f} %"
        + (f", top-5 {100 * results['top5']:.2f} %" if "top5" in results else ""),
    ]
    if "holdout_top1" in results:
        lines.append(f"hold-out: top-1 {100 * results['holdout_top1']:.2f} %")
    return "\n".join(lines)
