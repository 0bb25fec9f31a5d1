"""Linear evaluation of a pre-trained BYOL encoder: ``train_and_evaluate(config, workdir)``.

The paper's protocol (docs/evaluation.md#linear-evaluation): the encoder of a pre-training
run is frozen (BatchNorm in inference mode, stop-gradient), one linear layer on its
representation is trained with SGD (Nesterov momentum 0.9, lr 0.2 x batch/256, cosine decay
to 0, 80 epochs, no weight decay) on random-resized crops with flips, and top-1/top-5 are
measured on centre crops.

The encoder forward runs inside the mapped step (pmap or shard_map over all devices,
gradients averaged); the shared loop (``byol_jax.loop``) gives checkpoints of the classifier
in ``workdir``, exact resume, SIGTERM preemption and metrics; ``workdir/results.json`` holds
the result. The classifier itself is ``byol_jax.classifier`` (also usable on features).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
import optax
from flax import struct

from byol_jax import byol, checkpoint, classifier, lifecycle, loop, monitor, parallel, pretrained
from byol_jax import data as datasets

log = logging.getLogger(__name__)
RESULTS_FILE = "results.json"


@struct.dataclass
class LinearEvalState:
    """What the mapped step carries: the trainable classifier and the frozen encoder (a
    ByolState slimmed to the online encoder). Checkpoints hold the classifier only."""

    classifier: classifier.ClassifierState
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


def merged_data(
    pretraining: ml_collections.ConfigDict, overrides: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
    """The pre-training run's ``config.data`` with the fields the linear config sets."""
    data = datasets.default_data_config()
    data.update(pretraining.data.to_dict())
    data.update({k: v for k, v in overrides.to_dict().items() if v is not None})
    return data


def setup(config: ml_collections.ConfigDict, workdir: str, arrays: Mapping | None = None) -> Run:
    """Validate the config, load the pre-trained encoder and derive the run; every user error
    surfaces here, before any compilation."""
    _check_config(config, workdir)
    source = pretrained_source(config)
    pretraining = _pretrained_config(source)
    data = merged_data(pretraining, config.data)
    image_size = config.image_size or pretraining.image_size
    replicas = parallel.Replicas(config.parallel, byol.DEFAULT_AXIS)
    replicas.check_batch_size(config.batch_size)
    if config.eval_batch_size % replicas.num_local:
        raise ValueError(
            f"eval_batch_size={config.eval_batch_size} does not split over this process's "
            f"{replicas.num_local} devices: use a multiple of {replicas.num_local}."
        )
    train_split = datasets.probe_split(data)
    num_classes = datasets.require_labels(data, train_split, arrays)
    for split in filter(None, (data.eval_split, config.holdout_split)):
        datasets.require_labels(data, split, arrays)
    num_train = split_size(datasets.dataset_info(data, arrays)["num_examples"], train_split)
    total_steps = config.total_steps
    if total_steps <= 0:
        total_steps = config.num_epochs * max(1, num_train // config.batch_size)
    learner, state = _load_pretrained(source)
    encoder = _frozen_encoder(state)
    sample = np.zeros((1, image_size, image_size, 3), np.uint8)
    feature_dim = jax.eval_shape(learner.embed, encoder, sample).shape[-1]
    tx = classifier.linear_optimizer(
        batch_size=config.batch_size,
        total_steps=total_steps,
        base_learning_rate=config.base_learning_rate,
        reference_batch_size=config.reference_batch_size,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )
    step = int(state.step)
    return Run(config, data, image_size, learner, encoder, step, num_classes, feature_dim, tx, replicas, total_steps)  # fmt: skip


def pretrained_source(config: ml_collections.ConfigDict) -> str:
    """The encoder to evaluate: ``config.pretrained`` (any of pretrained.load's spellings) or
    ``config.pretrained_workdir`` (a byol_jax workdir), exactly one of them."""
    if bool(config.pretrained) == bool(config.pretrained_workdir):
        raise ValueError(
            "set one of --config.pretrained (a workdir, official:PATH or torchvision:PATH) and "
            "--config.pretrained_workdir (a byol_jax.train workdir)."
        )
    return config.pretrained or config.pretrained_workdir


def _check_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    kind, path = pretrained.parse(pretrained_source(config))
    if kind == "workdir" and os.path.realpath(path) == os.path.realpath(workdir):
        raise ValueError(
            f"--workdir {workdir} is the pre-training workdir: linear evaluation writes "
            "checkpoints of its own, pass another --workdir."
        )
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
    lifecycle.check_workdir(workdir)


def _pretrained_config(source: str) -> ml_collections.ConfigDict:
    try:
        return pretrained.load_config(source)[0]
    except checkpoint.CheckpointError as error:
        raise ValueError(f"the pre-trained encoder {source!r}: {error}") from error


def _load_pretrained(workdir: str) -> tuple[byol.BYOL, byol.ByolState]:
    """(learner, state) of the pre-training run; a ValueError naming the workdir when it has
    no readable checkpoint or its config.json describes another architecture."""
    try:
        return pretrained.load(workdir)
    except checkpoint.CheckpointError as error:
        raise ValueError(f"cannot load the pre-trained encoder {workdir!r}: {error}") from error


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
    lifecycle.start_distributed(config)
    run = setup(config, workdir, arrays)
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints
    )
    head = jax.device_get(classifier.init_classifier(run.feature_dim, run.num_classes, run.tx))
    restored = ckpt.restore_latest(head)
    start_step = 0
    if restored is not None:
        head, start_step = restored
        log.info("Resuming linear evaluation from step %d in %s.", start_step, workdir)
    checkpoint.save_config(workdir, {**config.to_dict(), "data": run.data.to_dict()})
    writer = monitor.MetricWriter(
        workdir,
        total_steps=run.total_steps,
        start_step=start_step,
        progress_bar=config.progress_bar,
    )
    try:
        rstate = _train(run, LinearEvalState(head, run.encoder), start_step, ckpt, writer, arrays)
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
        "train_split": datasets.probe_split(run.data),
        "pretrained": pretrained_source(run.config),
        "pretrained_step": run.pretrained_step,
    }


def _image_step(learner: byol.BYOL):
    """The per-replica step: frozen encoder forward (inference mode), then the classifier."""

    def step(state: LinearEvalState, images, key, labels):
        del key  # the augmentation is done on the host, keyed by (seed, step)
        representation = learner.embed(state.encoder, images)
        head, metrics = classifier.classifier_step(
            state.classifier, representation, labels, learner.axis_name
        )
        return state.replace(classifier=head), metrics

    return step


def _train(run: Run, state: LinearEvalState, start_step, ckpt, writer, arrays):
    """-> the state in device form after ``run.total_steps`` steps."""
    config, replicas = run.config, run.replicas
    rstate = replicas.replicate(state)
    if start_step >= run.total_steps:
        return rstate
    batches = datasets.linear_eval_batches(
        run.data,
        global_batch_size=config.batch_size,
        image_size=run.image_size,
        seed=config.seed,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        arrays=arrays,
    )
    device_batches = parallel.prefetch_to_device(
        ({k: b[k] for k in ("images", "labels")} for b in batches), replicas
    )
    mapped = replicas.map(_image_step(run.learner))
    step_key = jax.random.key(config.seed)

    def step(rstate, batch, step):
        key = jax.random.fold_in(step_key, step)
        return mapped(rstate, batch["images"], key, batch["labels"])

    return loop.run(
        step,
        rstate,
        device_batches,
        start_step=start_step,
        total_steps=run.total_steps,
        log_every=config.log_every,
        checkpoint_every=config.checkpoint_every,
        fetch=replicas.fetch,
        checkpointer=ckpt,
        to_checkpoint=lambda rstate: jax.device_get(replicas.unreplicate(rstate.classifier)),
        writer=writer,
        images_per_step=config.batch_size,
        hint="Lower base_learning_rate or check the pre-trained encoder's features.",
    )


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
        params = state.classifier.params
        return None, classifier.correct_counts(params, representation, labels, learner.axis_name)

    step_fn = run.replicas.map(eval_step, donate_state=False)
    batches = datasets.eval_batches(
        run.data,
        split=split,
        batch_size=run.config.eval_batch_size,
        image_size=run.image_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        arrays=arrays,
    )
    totals: dict[str, float] = {}
    key, shard = jax.random.key(0), run.replicas.shard
    for batch in batches:
        # Padding rows (mask False) get label -1: they are not counted.
        labels = np.where(batch["mask"], batch["labels"], -1).astype(np.int32)
        _, counts = step_fn(rstate, shard(batch["images"]), key, shard(labels))
        for k, v in run.replicas.fetch(counts).items():
            totals[k] = totals.get(k, 0.0) + v
    count = max(totals.pop("count", 0.0), 1.0)
    return {k: v / count for k, v in sorted(totals.items())}


def format_results(results: dict) -> str:
    """The closing lines a run prints."""
    lines = [
        f"Linear evaluation finished after {results['steps']} steps "
        f"(encoder of {results['pretrained']}, step {results['pretrained_step']}).",
        f"{results['eval_split']}: top-1 {100 * results['top1']:.2f} %"
        + (f", top-5 {100 * results['top5']:.2f} %" if "top5" in results else ""),
    ]
    if "holdout_top1" in results:
        lines.append(f"hold-out: top-1 {100 * results['holdout_top1']:.2f} %")
    return "\n".join(lines)
