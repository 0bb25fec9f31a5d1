"""The one training loop, shared by pre-training and linear evaluation.

``run`` steps a mapped step function over device batches and, on the configured cadence,
fetches the metrics (never a host sync per step), stops at the first non-finite value with
the last good checkpoint named, writes one summary per logging interval (every step of the
interval counted, checkpoint steps included), saves checkpoints, runs a monitor between
steps (its time excluded from images/s), and saves then exits on preemption.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from byol_jax import lifecycle, monitor

log = logging.getLogger("byol_jax")


def run(
    step_fn: Callable[[Any, Any, int], tuple[Any, Any]],
    state: Any,
    batches: Iterator,
    *,
    start_step: int,
    total_steps: int,
    log_every: int,
    checkpoint_every: int,
    fetch: Callable[[Any], dict],
    checkpointer,
    to_checkpoint: Callable[[Any], Any],
    writer: monitor.MetricWriter,
    images_per_step: int,
    finite: Sequence[str] = ("loss",),
    hint: str = "",
    between_steps: Callable[[int, Any], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Any:
    """Steps ``step_fn(state, batch, step) -> (state, device metrics)`` from ``start_step`` to
    ``total_steps`` and returns the final state (device form). ``to_checkpoint(state)`` is
    what a checkpoint holds; ``fetch`` turns device metrics into floats; ``finite`` names the
    metrics that must stay finite (``hint`` says what to do when one does not);
    ``between_steps(done, state)`` runs after each step (e.g. a kNN monitor)."""
    throughput = monitor.Throughput(images_per_step, clock)
    pending: list[tuple[int, Any]] = []  # device metrics not fetched yet
    rows: list[dict] = []  # fetched metrics not logged yet
    last_logged = start_step
    with lifecycle.preemption_signal() as preempted:
        for step in range(start_step, total_steps):
            state, metrics = step_fn(state, next(batches), step)
            pending.append((step, metrics))
            done = step + 1
            writer.advance()
            stop = lifecycle.should_stop(preempted, done)
            log_now = done % log_every == 0 or done == total_steps or stop
            save_now = done % checkpoint_every == 0 or done == total_steps or stop
            if log_now or save_now:  # fetch before saving: never save a non-finite state
                rows += [_checked(s, fetch(m), finite, checkpointer, hint) for s, m in pending]
                pending = []
            if log_now:
                summary = summarise(rows)
                writer.write(done, {**summary, "images_per_s": throughput(done - last_logged)})
                rows, last_logged = [], done
            if save_now:
                checkpointer.save(done, to_checkpoint(state), force=stop)
            if stop:
                _exit_preempted(checkpointer, done)
            if between_steps is not None:
                with throughput.paused():  # the monitor's time is not training time
                    between_steps(done, state)
    checkpointer.wait_until_finished()
    return state


def summarise(rows: list[dict]) -> dict:
    """Means over a logging interval of the steps that ran; skipped steps are counted. The
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


def _checked(step: int, row: dict, finite: Sequence[str], checkpointer, hint: str) -> dict:
    """The row, or NonFiniteLossError naming the step and the last good checkpoint. A step
    that skip_nonfinite_steps skipped kept the old state: it is counted, not fatal."""
    if row.get("skipped") or all(math.isfinite(row[k]) for k in finite):
        return row
    checkpointer.wait_until_finished()
    last = checkpointer.latest_step()
    where = f"step {last} in {checkpointer.directory}" if last is not None else "none was saved"
    values = ", ".join(f"{k} {row[k]}" for k in finite)
    raise lifecycle.NonFiniteLossError(
        f"training diverged at step {step + 1}: {values}. The last good checkpoint: {where}. {hint}"
    )


def _exit_preempted(checkpointer, step: int) -> None:
    checkpointer.wait_until_finished()
    log.warning(
        "Preempted: saved the checkpoint of step %d; exiting with %d.",
        step,
        lifecycle.PREEMPTED_EXIT_CODE,
    )
    raise lifecycle.Preempted()
