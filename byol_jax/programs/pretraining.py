"""The BYOL pre-training program: ``train_and_evaluate(config, workdir)``.

Everything a run needs is built from the config (``byol_jax.default_config``, built by
``byol_jax.builders``), checked before anything is compiled, and trained by the shared loop
(``byol_jax.loop``), the same on a laptop CPU, a GPU or a TPU pod:

* resume: the latest good checkpoint in ``workdir/checkpoints`` is restored; the step's key
  is ``fold_in(key, step)`` and the data order a function of (seed, step), so a resumed run
  ends bit-identical to an uninterrupted one;
* preemption and divergence as ``byol_jax.lifecycle`` describes;
* the kNN monitor every ``knn_every`` steps and at the end, with a random-init baseline.

Epoch-denominated settings under ``total_steps``: ``warmup_epochs`` is converted with the
data's steps per epoch (a warm-up longer than the run is an error; ``warmup_fraction`` gives
it as a part of the run), the tau schedule runs to ``total_steps``, and ``log_every``,
``checkpoint_every`` and ``knn_every`` count steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from byol_jax import (
    builders,
    byol,
    checkpoint,
    features,
    knn,
    lifecycle,
    loop,
    monitor,
    parallel,
    pretrained,
)
from byol_jax import data as datasets

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
    """What ``setup`` derives from a config: the pieces of one pre-training run."""

    config: ml_collections.ConfigDict
    learner: byol.BYOL
    tx: Any  # optax.GradientTransformation
    replicas: parallel.Replicas
    total_steps: int
    steps_per_epoch: int
    info: dict

    @property
    def facts(self) -> dict:
        """What config.json records beside the config, so the workdir loads on its own."""
        return {
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "num_classes": self.learner.num_classes,
        }


def setup(config: ml_collections.ConfigDict, workdir: str, arrays: Mapping | None = None) -> Run:
    """Validate the config and derive the run; every user error surfaces here, before any
    compilation or image decoding."""
    builders.check_config(config)
    lifecycle.check_workdir(workdir)
    replicas = parallel.Replicas(config.parallel, byol.DEFAULT_AXIS)
    replicas.check_batch_size(config.batch_size)
    datasets.check_data_config(config.data)
    info = datasets.dataset_info(config.data, arrays)
    num_train = info["num_examples"].get(config.data.train_split)
    if not num_train:
        raise ValueError(
            f"split {config.data.train_split!r} not found or empty; the data has "
            f"{info['num_examples']}: set config.data.train_split."
        )
    steps_per_epoch = max(1, num_train // config.batch_size)
    total_steps = (
        config.total_steps if config.total_steps > 0 else config.num_epochs * steps_per_epoch
    )
    _check_probe_labels(config, info, arrays)
    _check_pretrained(config)
    learner = builders.build_learner(config, total_steps, info.get("num_classes"))
    builders.check_encoder_input(config, learner)
    tx = builders.build_optimizer(config, total_steps, steps_per_epoch)
    return Run(config, learner, tx, replicas, total_steps, steps_per_epoch, info)


def _check_pretrained(config) -> None:
    """The authors' weights were trained with 'same' padding: another would shift them."""
    kind, path = pretrained.parse(config.pretrained) if config.pretrained else (None, None)
    if kind == "official" and config.padding != "same":
        raise ValueError(
            f"config.pretrained={config.pretrained!r} holds the authors' weights, trained with "
            "'same' padding: set --config.padding=same (and the encoder they are: e.g. "
            "--config.encoder=resnet50)."
        )
    if kind == "workdir" and config.pretrained and not os.path.isdir(path):
        raise ValueError(f"config.pretrained={config.pretrained!r} is not a workdir.")


def _check_probe_labels(config, info, arrays) -> None:
    """The online probe learns from the pre-training split's labels: it needs some."""
    if not (config.online_probe and info.get("num_classes")):
        return
    if not datasets.split_has_labels(config.data, config.data.train_split, arrays):
        raise ValueError(
            f"config.online_probe=True trains a linear probe on the labels of the pre-training "
            f"split data.train_split={config.data.train_split!r}, which has none: set "
            "--config.online_probe=False, or pre-train on a split with some labels (STL-10: "
            "'train+unlabelled'; unlabelled rows are skipped by the probe)."
        )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, arrays: Mapping | None = None
) -> dict:
    """Pre-train BYOL as the config says, in ``workdir``; returns the final summary
    (steps, and kNN accuracies when evaluated). Resumes from ``workdir`` if it holds
    checkpoints. ``arrays`` feeds in-memory data for ``config.data.source='arrays'``."""
    lifecycle.start_distributed(config)
    run = setup(config, workdir, arrays)
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints
    )
    init_key, step_key = jax.random.split(jax.random.key(config.seed))
    state = run.learner.init(init_key, builders.sample_images(config), run.tx)
    restored = ckpt.restore_latest(jax.device_get(state))
    start_step = 0
    if restored is not None:
        state, start_step = restored
        log.info("Resuming from the checkpoint of step %d in %s.", start_step, workdir)
    elif config.pretrained:  # a fresh run starts from imported weights
        state = pretrained.place(
            state, pretrained.weights(config.pretrained), where=config.pretrained
        )
        state = state.replace(step=jnp.zeros((), jnp.int32))  # the schedules start afresh
        log.info("Starting from the weights of %s.", config.pretrained)
    lifecycle.save_run_config(workdir, config, run.facts)
    writer = monitor.MetricWriter(
        workdir,
        total_steps=run.total_steps,
        start_step=start_step,
        progress_bar=config.progress_bar,
    )
    try:
        state = _train(run, state, start_step, step_key, ckpt, writer, arrays)
        summary = {"steps": run.total_steps, **_final_evaluation(run, state, arrays)}
        if summary.get("knn_top1") is not None:
            writer.write(run.total_steps, {k: v for k, v in summary.items() if k.startswith("knn")})
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
        return summary
    finally:
        writer.close()
        ckpt.close()
        from byol_jax import plots  # noqa: PLC0415 (matplotlib only when a run ends)

        plots.plot_training_curves(workdir)  # never raises; nothing without metrics


def _train(run: Run, state, start_step, step_key, ckpt, writer, arrays) -> byol.ByolState:
    """The loop over the pre-training batches -> the final state (host copy)."""
    config, replicas = run.config, run.replicas
    batches = datasets.pretrain_batches(
        config.data,
        global_batch_size=config.batch_size,
        image_size=config.image_size,
        seed=config.seed,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        arrays=arrays,
    )
    image_key = "views" if config.data.host_crop else "images"
    keys = (image_key, "labels") if run.learner.num_classes else (image_key,)
    device_batches = parallel.prefetch_to_device(
        ({k: b[k] for k in keys} for b in batches), replicas
    )
    mapped = replicas.map(run.learner.train_step)

    def step(rstate, batch, step):
        key = jax.random.fold_in(step_key, step)
        return mapped(rstate, batch[image_key], key, batch.get("labels"))

    def monitor_knn(done, rstate):
        if config.knn_every > 0 and done % config.knn_every == 0 and done < run.total_steps:
            if run.info.get("num_classes"):
                accuracy = knn_evaluate(run, replicas.unreplicate(rstate), arrays)
                writer.write(done, {f"knn_{k}": v for k, v in accuracy.items()})

    rstate = loop.run(
        step,
        replicas.replicate(state),
        device_batches,
        start_step=start_step,
        total_steps=run.total_steps,
        log_every=config.log_every,
        checkpoint_every=config.checkpoint_every,
        fetch=replicas.fetch,
        checkpointer=ckpt,
        to_checkpoint=lambda rstate: jax.device_get(replicas.unreplicate(rstate)),
        writer=writer,
        images_per_step=config.batch_size,
        finite=("loss", "param_norm"),
        hint="Lower base_learning_rate, check the input data, or set "
        "skip_nonfinite_steps=True to skip such steps.",
        between_steps=monitor_knn,
    )
    return jax.device_get(replicas.unreplicate(rstate))


def _final_evaluation(run: Run, state, arrays) -> dict:
    config = run.config
    if not config.knn_at_end or not run.info.get("num_classes"):
        return {}
    result = {f"knn_{k}": v for k, v in knn_evaluate(run, state, arrays).items()}
    if config.knn_baseline:  # the same encoder at random initialisation, for comparison
        random_state = run.learner.init(jax.random.key(config.seed + 1), builders.sample_images(config), state.tx)  # fmt: skip
        baseline = knn_evaluate(run, random_state, arrays)
        result.update({f"knn_random_init_{k}": v for k, v in baseline.items()})
    return result


def knn_evaluate(run: Run, state: byol.ByolState, arrays=None) -> dict[str, float]:
    """kNN top-1/top-5 of the online representation: the probe split (default the training
    split) is the bank, the evaluation split the queries."""
    config = run.config

    def embedded(split):
        out = features.embed_dataset(
            run.learner,
            state,
            config.data,
            split,
            batch_size=config.eval_batch_size,
            image_size=config.image_size,
            arrays=arrays,
        )
        return out["representations"], out["labels"]

    bank, bank_labels = embedded(datasets.probe_split(config.data))
    queries, labels = embedded(config.data.eval_split)
    return knn.knn_accuracy(
        bank,
        bank_labels,
        queries,
        labels,
        num_classes=run.info["num_classes"],
        k=config.knn_k,
        temperature=config.knn_temperature,
    )


def format_summary(summary: dict) -> str:
    """The closing lines a run prints: steps and the kNN figures it measured."""
    lines = [f"BYOL pre-training finished after {summary['steps']} steps."]
    if "knn_top1" in summary:
        lines.append(f"kNN top-1 of the learned representation: {100 * summary['knn_top1']:.1f} %")
    if "knn_random_init_top1" in summary:
        baseline = 100 * summary["knn_random_init_top1"]
        lines.append(f"kNN top-1 of a randomly initialised encoder:  {baseline:.1f} %")
    return "\n".join(lines)
