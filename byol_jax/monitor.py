"""Watching a run: TensorBoard event files, readable log lines and a progress bar.

Only process 0 writes; the others get a silent writer, so callers never branch on it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time

import jax

log = logging.getLogger("byol_jax")


def setup_logging(level: int = logging.INFO) -> None:
    """byol_jax's own messages at ``level`` on stderr; libraries' (absl: orbax, jax) at
    WARNING, so a run prints its progress, not orbax's internals."""
    from absl import logging as absl_logging  # noqa: PLC0415

    absl_logging.set_verbosity(absl_logging.WARNING)
    if not any(getattr(h, "_byol_jax", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        handler._byol_jax = True
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


class MetricWriter:
    """``write(step, metrics)`` -> a ``[step] name = value`` log line, TensorBoard scalars
    under ``workdir/tensorboard`` and a line of ``workdir/metrics.jsonl`` (for plots)."""

    def __init__(self, workdir: str, *, total_steps: int, start_step: int, progress_bar: bool):
        self.active = jax.process_index() == 0
        self.workdir = workdir
        self._tb = self._bar = None
        if not self.active:
            return
        from tensorboardX import SummaryWriter  # noqa: PLC0415 (only process 0 needs it)

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        path = os.path.join(workdir, "metrics.jsonl")
        _truncate_after(path, start_step)  # a resumed run writes those steps again
        self._jsonl = open(path, "a")  # noqa: SIM115
        if progress_bar:
            from tqdm import tqdm  # noqa: PLC0415

            # disable=None: no bar when stderr is not a terminal (CI logs, batch jobs).
            self._bar = tqdm(
                total=total_steps, initial=start_step, disable=None, unit="step", dynamic_ncols=True
            )

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        for name, value in metrics.items():
            self._tb.add_scalar(name, value, step)
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        line = ", ".join(f"{k} = {_fmt(v)}" for k, v in sorted(metrics.items()))
        log.info("[%d] %s", step, line)
        if self._bar is not None:
            self._bar.set_postfix(
                {k: _fmt(v) for k, v in metrics.items() if k in ("loss", "images_per_s")}
            )

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        if not self.active:
            return
        if self._bar is not None:
            self._bar.close()
        self._tb.close()
        self._jsonl.close()


def _truncate_after(path: str, step: int) -> None:
    """Keep the rows of ``path`` up to ``step`` (atomically: temp file, then rename)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def _fmt(value: float) -> str:
    if isinstance(value, int) or (
        isinstance(value, float) and value.is_integer() and abs(value) < 1e6
    ):
        return str(int(value))
    return f"{value:.4g}" if math.isfinite(value) else str(value)


class Throughput:
    """Images per second between calls, by ``clock`` (wall-clock seconds by default)."""

    def __init__(self, images_per_step: int, clock=time.perf_counter):
        self.images_per_step = images_per_step
        self._clock = clock
        self._time = clock()

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside does not count towards the next rate."""
        start = self._clock()
        yield
        self._time += self._clock() - start

    def __call__(self, steps: int) -> float:
        now = self._clock()
        rate = steps * self.images_per_step / max(now - self._time, 1e-9)
        self._time = now
        return rate


def read_metrics(workdir: str) -> list[dict]:
    """The rows ``MetricWriter`` appended to ``workdir/metrics.jsonl``."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
