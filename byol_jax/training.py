"""The BYOL pre-training program: ``train_and_evaluate(config, workdir)``.

Everything a run needs is built from the config (see ``byol_jax.default_config``), checked
before anything is compiled, and the loop is the same on a laptop CPU, a GPU or a TPU pod:

* resume: the latest good checkpoint in ``workdir/checkpoints`` is restored; the step's key
  is ``fold_in(key, step)`` and the data order a function of (seed, step), so a resumed run
  ends bit-identical to an uninterrupted one;
* preemption: SIGTERM saves a checkpoint at the next step boundary and the process exits
  with ``PREEMPTED_EXIT_CODE`` (every process of a cluster at the same step);
* a non-finite loss stops the run with the step and the last good checkpoint named.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from byol_jax import (
    augment,
    byol,
    checkpoint,
    default_config,
    evaluate,
    input_pipeline,
    monitor,
    networks,
    optim,
    parallel,
)

log = logging.getLogger(__name__)
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again", what a scheduler should requeue


RUN_KEY = "_run"  # config.json's record of what setup derived, so a workdir loads on its own


def run_facts(run: Run) -> dict:
    return {
        "total_steps": run.total_steps,
        "steps_per_epoch": run.steps_per_epoch,
        "num_classes": run.learner.num_classes,
    }


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite."""


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is saved; exits with PREEMPTED_EXIT_CODE."""

    def __init__(self):
        super().__init__(PREEMPTED_EXIT_CODE)


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


# ------------------------------------------------------------------------------ building


def build_encoder(config: ml_collections.ConfigDict, dtype=jnp.float32):
    """The encoder module the config names."""
    return networks.encoder_by_name(
        config.encoder,
        width_multiplier=config.width_multiplier,
        num_filters=config.num_filters,
        cifar_stem=config.cifar_stem,
        dtype=dtype,
    )


def compute_dtype(name: str):
    """'float32', 'bfloat16', or 'auto': bfloat16 on GPU/TPU (parameters, optimiser state, EMA
    and loss stay float32), float32 on the CPU, where bf16 was slower (README, "Measured")."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(name)
    if dtype is None:
        raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {name!r}.")
    return dtype


def build_learner(
    config: ml_collections.ConfigDict, total_steps: int, num_classes: int | None = None
) -> byol.BYOL:
    """The BYOL learner of a config: encoder, views, tau schedule, precision, and the online
    probe when ``config.online_probe`` and the data has ``num_classes`` classes."""
    dtype = compute_dtype(config.dtype)
    view1, view2 = augment.recipe_configs(
        config.augment.name,
        config.image_size,
        view1=default_config.view_overrides(config.augment.view1),
        view2=default_config.view_overrides(config.augment.view2),
        **({"crop": False} if config.data.host_crop else {}),
    )
    if config.tau_schedule == "cosine":
        tau = byol.cosine_tau_schedule(config.base_tau, total_steps)
    elif config.tau_schedule == "constant":
        tau = config.base_tau
    else:
        raise ValueError(
            f"tau_schedule must be 'cosine' or 'constant', got {config.tau_schedule!r}."
        )
    return byol.BYOL(
        build_encoder(config, dtype),
        image_size=config.image_size,
        hidden_layer=config.hidden_layer,
        projection_size=config.projection_size,
        projection_hidden_size=config.projection_hidden_size,
        augment_fn=augment.make_view(view1),
        augment_fn2=augment.make_view(view2),
        moving_average_decay=tau,
        use_momentum=config.use_momentum,
        sync_batchnorm=config.sync_batchnorm,
        views_in_one_batch=config.views_in_one_batch,
        preprocess_fn=_eval_preprocess(view1),
        dtype=dtype,
        skip_nonfinite_steps=config.skip_nonfinite_steps,
        num_classes=num_classes if config.online_probe else None,
    )


# The ViewConfig fields of the crop: with data.host_crop the host crops and the device does not.
_CROP_FIELDS = ("crop", "crop_area", "crop_ratio", "crop_last", "resize_method", "allow_upscale")


def _check_host_crop(config: ml_collections.ConfigDict) -> None:
    if not config.data.host_crop:
        return
    for view in ("view1", "view2"):
        given = [f for f in _CROP_FIELDS if config.augment[view][f] is not None]
        if given:
            raise ValueError(
                f"config.augment.{view}.{given[0]} is set, but data.host_crop=True: the host "
                "crops both views with data.crop_area and data.crop_ratio and the device does not "
                f"crop again. Set --config.data.crop_area / data.crop_ratio instead of "
                f"augment.{view}.{given[0]}, or data.host_crop=False to crop on the device."
            )


def _eval_preprocess(view: augment.ViewConfig):
    """What the encoder sees at evaluation: the view's normalisation, no randomness."""
    mean, std = jnp.asarray(view.mean), jnp.asarray(view.std)

    def preprocess(images):
        x = images.astype(jnp.float32)
        x = x / 255.0 if images.dtype == jnp.uint8 else x
        return (x - mean) / std if view.normalize else x

    return preprocess


def build_optimizer(config: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int):
    """The config's optimiser with its learning-rate schedule (linear scaling, warm-up, decay)."""
    schedule = optim.learning_rate_schedule(
        config.base_learning_rate,
        batch_size=config.batch_size,
        total_steps=total_steps,
        warmup_steps=warmup_steps(config, total_steps, steps_per_epoch),
        schedule=config.lr_schedule,
        reference_batch_size=config.reference_batch_size or None,
    )
    return optim.create_optimizer(
        config.optimizer,
        schedule,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
        trust_coefficient=config.trust_coefficient,
    )


def warmup_steps(config: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int) -> int:
    """The warm-up in steps: ``warmup_fraction`` of the run when set, else ``warmup_epochs``
    epochs. A warm-up that does not end before the run does is an error, never squeezed in."""
    if config.warmup_fraction is not None:
        if not 0.0 <= config.warmup_fraction < 1.0:
            raise ValueError(
                f"config.warmup_fraction must be in [0, 1), got {config.warmup_fraction}."
            )
        return int(config.warmup_fraction * total_steps)
    steps = int(config.warmup_epochs * steps_per_epoch)
    if steps >= total_steps:
        longest = (total_steps - 1) / steps_per_epoch
        raise ValueError(
            f"the warm-up of {config.warmup_epochs:g} epochs is {steps} steps "
            f"({steps_per_epoch} steps per epoch), but the run has only {total_steps} steps: "
            f"the learning rate would never leave the warm-up. Shorten it with "
            f"--config.warmup_epochs={math.floor(longest * 100) / 100:g} or less, or give it as "
            "a fraction of the run, e.g. --config.warmup_fraction=0.1."
        )
    return steps


def setup(config: ml_collections.ConfigDict, workdir: str, arrays: Mapping | None = None) -> Run:
    """Validate the config and derive the run; every user error surfaces here, before any
    compilation or data reading."""
    _check_config(config)
    check_workdir(workdir)
    replicas = parallel.Replicas(config.parallel, byol.DEFAULT_AXIS)
    replicas.check_batch_size(config.batch_size)
    input_pipeline.check_data_config(config.data)
    info = input_pipeline.dataset_info(config.data, arrays)
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
    learner = build_learner(config, total_steps, info.get("num_classes"))
    _check_encoder_input(config, learner)
    tx = build_optimizer(config, total_steps, steps_per_epoch)
    return Run(config, learner, tx, replicas, total_steps, steps_per_epoch, info)


def _check_probe_labels(config, info, arrays) -> None:
    """The online probe learns from the pre-training split's labels: it needs some."""
    if not (config.online_probe and info.get("num_classes")):
        return
    if not input_pipeline.split_has_labels(config.data, config.data.train_split, arrays):
        raise ValueError(
            f"config.online_probe=True trains a linear probe on the labels of the pre-training "
            f"split data.train_split={config.data.train_split!r}, which has none: set "
            "--config.online_probe=False, or pre-train on a split with some labels (STL-10: "
            "'train+unlabelled'; unlabelled rows are skipped by the probe)."
        )


def _check_encoder_input(config, learner) -> None:
    """Images must survive the encoder's downsampling, and hidden_layer must exist."""
    stride = networks.total_stride(learner.encoder)
    if config.image_size < stride:
        raise ValueError(
            f"image_size {config.image_size} is smaller than the total stride {stride} of "
            f"{config.encoder}{' (3x3 stem)' if config.cifar_stem else ''}: use images of at "
            f"least {stride} px, or cifar_stem=True for small images."
        )
    if config.hidden_layer is not None:  # resolves the path by tracing only: a clear error now
        learner._resolve_hidden_path(jax.ShapeDtypeStruct(_sample(config).shape, jnp.float32))


def check_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"cannot create the workdir {workdir}: {e}. Pass a writable --workdir."
        ) from e
    if not os.access(workdir, os.W_OK):
        raise ValueError(f"the workdir {workdir} is not writable: pass a writable --workdir.")


def _check_config(config: ml_collections.ConfigDict) -> None:
    positive = (
        "batch_size",
        "image_size",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "projection_size",
        "projection_hidden_size",
        "eval_batch_size",
        "width_multiplier",
        "num_filters",
    )
    for name in positive:
        if config[name] <= 0:
            raise ValueError(f"config.{name} must be positive, got {config[name]}.")
    if config.total_steps <= 0 and config.num_epochs <= 0:
        raise ValueError("set config.total_steps or config.num_epochs to a positive number.")
    if config.base_learning_rate < 0:
        raise ValueError(
            f"config.base_learning_rate must be >= 0, got {config.base_learning_rate}."
        )
    if not 0.0 <= config.base_tau <= 1.0:
        raise ValueError(f"config.base_tau must be in [0, 1], got {config.base_tau}.")
    if config.batch_size < 2:
        raise ValueError("config.batch_size must be at least 2 (BatchNorm needs batch statistics).")
    _check_host_crop(config)


# ---------------------------------------------------------------------------------- loop


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, arrays: Mapping | None = None
) -> dict:
    """Pre-train BYOL as the config says, in ``workdir``; returns the final summary
    (steps, loss, and kNN accuracies when evaluated). Resumes from ``workdir`` if it holds
    checkpoints. ``arrays`` feeds in-memory data for ``config.data.source='arrays'``."""
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
    init_key, step_key = jax.random.split(jax.random.key(config.seed))
    state = run.learner.init(init_key, _sample(config), run.tx)
    restored = ckpt.restore_latest(jax.device_get(state))
    start_step = 0
    if restored is not None:
        state, start_step = restored
        log.info("Resuming from the checkpoint of step %d in %s.", start_step, workdir)
    checkpoint.save_config(workdir, {**config.to_dict(), RUN_KEY: run_facts(run)})
    writer = monitor.MetricWriter(
        workdir,
        total_steps=run.total_steps,
        start_step=start_step,
        progress_bar=config.progress_bar,
    )
    try:
        with preemption_signal() as preempted:
            state = _train_loop(run, state, start_step, step_key, ckpt, writer, preempted, arrays)
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
        from byol_jax import pictures  # noqa: PLC0415 (matplotlib only when a run ends)

        pictures.plot_training_curves(workdir)  # never raises; nothing without metrics


def _train_loop(run, state, start_step, step_key, ckpt, writer, preempted, arrays):
    config, replicas = run.config, run.replicas
    batches = input_pipeline.pretrain_batches(
        config.data,
        global_batch_size=config.batch_size,
        image_size=config.image_size,
        seed=config.seed,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        arrays=arrays,
    )
    key_name = "views" if config.data.host_crop else "images"
    keys = (key_name, "labels") if run.learner.num_classes else (key_name,)
    device_batches = parallel.prefetch_to_device(
        ({k: b[k] for k in keys} for b in batches), replicas
    )
    step_fn = replicas.map(run.learner.train_step)
    rstate = replicas.replicate(state)
    pending: list[tuple[int, Any]] = []  # device metrics not yet fetched (no host sync per step)
    throughput = monitor.Throughput(config.batch_size)
    last_logged = start_step
    for step in range(start_step, run.total_steps):
        batch = next(device_batches)
        rstate, metrics = step_fn(
            rstate, batch[key_name], jax.random.fold_in(step_key, step), batch.get("labels")
        )
        pending.append((step, metrics))
        done = step + 1
        writer.advance()
        stop = should_stop(preempted, done)
        if done % config.log_every == 0 or done == run.total_steps or stop:
            rows = _fetch(replicas, pending, ckpt)
            pending = []
            summary = _summarise(rows)
            summary["images_per_s"] = throughput(done - last_logged)
            last_logged = done
            writer.write(done, summary)
        if done % config.checkpoint_every == 0 or done == run.total_steps or stop:
            _fetch(replicas, pending, ckpt)  # never save a state that went non-finite
            pending = []
            ckpt.save(done, jax.device_get(replicas.unreplicate(rstate)), force=stop)
        if config.knn_every > 0 and done % config.knn_every == 0 and done < run.total_steps:
            with throughput.paused():  # the monitor's time is not training time
                _knn_monitor(run, replicas.unreplicate(rstate), done, writer, arrays)
        if stop:
            ckpt.wait_until_finished()
            log.warning(
                "Preempted: saved the checkpoint of step %d; exiting with %d.",
                done,
                PREEMPTED_EXIT_CODE,
            )
            raise Preempted()
    ckpt.wait_until_finished()
    return jax.device_get(replicas.unreplicate(rstate))


def _summarise(rows: list[dict]) -> dict:
    """Means over the logging interval of the steps that ran; skipped steps are counted. The
    probe's figures are over the interval's labelled rows (steps weighted by their count)."""
    kept = [r for r in rows if not r.get("skipped")] or rows
    summary = {k: float(np.mean([r[k] for r in kept])) for k in rows[-1]}
    if "skipped" in rows[-1]:
        summary["skipped"] = float(sum(r["skipped"] for r in rows))
    if "probe_count" in rows[-1]:
        count = sum(r["probe_count"] for r in kept)
        for key in ("probe_loss", "probe_top1"):
            summary[key] = sum(r[key] * r["probe_count"] for r in kept) / max(count, 1.0)
        summary["probe_count"] = float(count)
    return summary


def _fetch(replicas, pending, ckpt) -> list[dict]:
    """Host copies of pending step metrics; stops the run at the first non-finite loss."""
    rows = []
    for step, metrics in pending:
        row = replicas.fetch(metrics)
        if row.get("skipped"):  # skip_nonfinite_steps kept the old state: count, don't stop
            rows.append(row)
            continue
        if not (math.isfinite(row["loss"]) and math.isfinite(row["param_norm"])):
            ckpt.wait_until_finished()
            last = ckpt.latest_step()
            where = f"step {last} in {ckpt.directory}" if last is not None else "none was saved"
            raise NonFiniteLossError(
                f"training diverged at step {step + 1}: loss {row['loss']}, parameter norm "
                f"{row['param_norm']}. The last good checkpoint: "
                f"{where}. Lower base_learning_rate, check the input data, or set "
                "skip_nonfinite_steps=True to skip such steps."
            )
        rows.append(row)
    return rows


def _knn_monitor(run, state, step, writer, arrays) -> None:
    """kNN top-1/top-5 of the current online representation, written as metrics."""
    if not run.info.get("num_classes"):
        return
    accuracy = knn_evaluate(run, state, arrays)
    writer.write(step, {f"knn_{k}": v for k, v in accuracy.items()})


def _sample(config) -> np.ndarray:
    return np.zeros((2, config.image_size, config.image_size, 3), np.uint8)


def _final_evaluation(run, state, arrays) -> dict:
    config = run.config
    if not config.knn_at_end or not run.info.get("num_classes"):
        return {}
    result = {}
    learned = knn_evaluate(run, state, arrays)
    result.update({f"knn_{k}": v for k, v in learned.items()})
    if config.knn_baseline:
        random_state = run.learner.init(jax.random.key(config.seed + 1), _sample(config), state.tx)
        baseline = knn_evaluate(run, random_state, arrays)
        result.update({f"knn_random_init_{k}": v for k, v in baseline.items()})
    return result


def knn_evaluate(run: Run, state: byol.ByolState, arrays=None) -> dict[str, float]:
    """kNN top-1/top-5 of the online representation: the training split is the bank, the
    evaluation split the queries."""
    config = run.config

    def features(split):
        batches = input_pipeline.eval_batches(
            config.data,
            split=split,
            batch_size=config.eval_batch_size,
            image_size=config.image_size,
            arrays=arrays,
        )
        return evaluate.extract_features(lambda x: run.learner.embed(state, x), batches)

    bank, bank_labels = features(input_pipeline.probe_split(config.data))
    queries, labels = features(config.data.eval_split)
    return evaluate.knn_accuracy(
        bank,
        bank_labels,
        queries,
        labels,
        num_classes=run.info["num_classes"],
        k=config.knn_k,
        temperature=config.knn_temperature,
    )


# ---------------------------------------------------------------------------- preemption


class preemption_signal:
    """Context manager: a flag list set by SIGTERM, the handler restored on exit."""

    def __enter__(self):
        self.flag: list[bool] = []
        self._previous = None
        if jax.process_count() == 1:
            try:
                self._previous = signal.signal(signal.SIGTERM, lambda *_: self.flag.append(True))
            except ValueError:  # not the main thread (e.g. a notebook worker): no handler
                self._previous = None
        return self.flag

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def should_stop(flag: list[bool], step: int) -> bool:
    """True on every process at the same step once a SIGTERM arrived (on one process)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils  # noqa: PLC0415

    # JAX's preemption sync manager (started by jax.distributed.initialize) catches SIGTERM
    # and agrees on one step across the cluster.
    return multihost_utils.reached_preemption_sync_point(step)


def format_summary(summary: dict) -> str:
    """The closing lines a run prints: steps and the kNN figures it measured."""
    lines = [f"BYOL pre-training finished after {summary['steps']} steps."]
    if "knn_top1" in summary:
        lines.append(f"kNN top-1 of the learned representation: {100 * summary['knn_top1']:.1f} %")
    if "knn_random_init_top1" in summary:
        lines.append(
            f"kNN top-1 of a randomly initialised encoder:  {100 * summary['knn_random_init_top1']:.1f} %"
        )
    return "\n".join(lines)
