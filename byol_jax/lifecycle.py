"""The life of a run, apart from its step: joining a cluster, the workdir, preemption and
divergence. Shared by every program so that each stops, saves and reports the same way.

* preemption: SIGTERM sets a flag; ``should_stop`` turns it into the same decision on every
  process at the same step; the program saves and raises ``Preempted``, which exits with
  ``PREEMPTED_EXIT_CODE`` (EX_TEMPFAIL: what a scheduler should requeue);
* divergence: ``NonFiniteLossError`` names the step and the last good checkpoint;
* the workdir: created and checked writable before anything compiles; ``config.json`` holds
  the run's config and, under ``RUN_KEY``, the facts setup derived, so a workdir loads alone.
"""

from __future__ import annotations

import os
import signal

import jax
import ml_collections

from byol_jax import checkpoint, parallel

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"
RUN_KEY = "_run"  # config.json's record of what setup derived (total_steps, num_classes, ...)


class NonFiniteLossError(FloatingPointError):
    """The loss (or the parameters) became NaN or infinite."""


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is saved; exits with PREEMPTED_EXIT_CODE."""

    def __init__(self):
        super().__init__(PREEMPTED_EXIT_CODE)


def start_distributed(config: ml_collections.ConfigDict) -> None:
    """``config.distributed``: join the cluster (TPU pod, SLURM, or the given coordinator)
    before anything else touches JAX."""
    if config.distributed:
        parallel.initialize_distributed(
            config.coordinator_address or None,
            config.num_processes or None,
            None if config.process_id < 0 else config.process_id,
        )


def check_workdir(workdir: str) -> None:
    """Creates ``workdir``; a ValueError that says what to pass when it cannot be written."""
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"cannot create the workdir {workdir}: {e}. Pass a writable --workdir."
        ) from e
    if not os.access(workdir, os.W_OK):
        raise ValueError(f"the workdir {workdir} is not writable: pass a writable --workdir.")


def save_run_config(workdir: str, config: ml_collections.ConfigDict, facts: dict) -> None:
    """``workdir/config.json``: the config and the facts setup derived from it."""
    checkpoint.save_config(workdir, {**config.to_dict(), RUN_KEY: facts})


def load_run_config(workdir: str) -> tuple[ml_collections.ConfigDict, dict]:
    """(the run's config, the facts setup derived: total_steps, steps_per_epoch, num_classes)
    of a pre-training workdir; CheckpointError when it was not written by byol_jax.train."""
    values = checkpoint.load_config(workdir)
    facts = values.pop(RUN_KEY, None)
    if facts is None:
        raise checkpoint.CheckpointError(
            f"{workdir}/config.json was not written by byol_jax.train: it has no "
            f"'{RUN_KEY}' record. Point to a workdir of a byol_jax training run."
        )
    return ml_collections.ConfigDict(values), facts


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
