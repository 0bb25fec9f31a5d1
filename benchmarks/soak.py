"""Long-run stability: a tiny BYOL model for many steps on the CPU, through the real loop.

    nice -n 10 python benchmarks/soak.py --steps 10000 --workdir /tmp/byol_soak

``pretraining.train_and_evaluate`` runs the quickstart config shrunk to a tiny ResNet, with its
cosine learning-rate and tau schedules and LARS, logging every ``--log_every`` steps and
checkpointing every ``--checkpoint_every``. A thread samples the process's resident memory
(VmRSS) once a second. Reported:

* memory growth (MB): RSS at the end minus RSS at 25 % of the wall time (compilation,
  the first checkpoints and the data are in memory by then), and the least-squares slope
  over the rest per 1000 steps (wall time taken as proportional to steps);
* step-time drift: mean step time of the last 10 % of steps over the first 10 % (after the
  first logged interval, which holds compilation);
* that every logged loss stayed finite (a non-finite one would also stop the run).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import helpers  # noqa: E402 (the tests' config and subprocess helpers)


def rss_mb() -> float:
    """This process's resident set size in MB (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise OSError("no VmRSS in /proc/self/status")


class MemorySampler(threading.Thread):
    """Samples (seconds since start, RSS MB) every `interval` seconds until stopped."""

    def __init__(self, interval: float = 1.0):
        super().__init__(daemon=True)
        self.interval, self.samples, self._done = interval, [], threading.Event()
        self._start = time.monotonic()

    def run(self):
        while not self._done.is_set():
            self.samples.append((time.monotonic() - self._start, rss_mb()))
            self._done.wait(self.interval)

    def stop(self) -> list[tuple[float, float]]:
        self._done.set()
        self.join()
        return self.samples


def soak_config(steps: int, log_every: int, checkpoint_every: int):
    """The quickstart config shrunk to a tiny model, for `steps` steps."""
    config = helpers.load_config(
        "quickstart",
        ("batch_size", 16),
        ("total_steps", steps),
        ("log_every", log_every),
        ("checkpoint_every", checkpoint_every),
        ("knn_at_end", False),
    )
    # The quickstart recipe's schedules and optimiser, stated so a config change shows here.
    config.optimizer, config.lr_schedule, config.tau_schedule = "lars", "cosine", "cosine"
    return config


def analyse(rows: list[dict], samples, batch_size: int, steps: int) -> dict:
    """The figures from metrics.jsonl rows and (seconds, RSS MB) samples."""
    train = [r for r in rows if "loss" in r]
    tenth = max(1, steps // 10)
    # A row's images_per_s covers the steps since the previous row: seconds per step is
    # batch_size / images_per_s. The first row holds compilation and is left out.
    step_s = [(r["step"], batch_size / r["images_per_s"]) for r in train[1:]]
    first = [t for s, t in step_s if s <= train[0]["step"] + tenth]
    last = [t for s, t in step_s if s > steps - tenth]
    # Memory from 25 % of the wall time on: on a CPU the first ~20 % hold compilation, the
    # data and the first checkpoints (measured: RSS plateaus by then).
    after = [(t, m) for t, m in samples if t >= 0.25 * samples[-1][0]]
    first_ms, last_ms = 1000 * sum(first) / len(first), 1000 * sum(last) / len(last)
    return {
        "steps": train[-1]["step"],
        "loss_finite": all(_finite(r["loss"]) for r in train),
        "loss_first": train[0]["loss"],
        "loss_last": train[-1]["loss"],
        "rss_at_25pct_mb": after[0][1],
        "rss_end_mb": after[-1][1],
        "rss_peak_mb": max(m for _, m in samples),
        "memory_growth_mb": after[-1][1] - after[0][1],
        "memory_slope_mb_per_1000_steps": 1000 * _slope(after) * samples[-1][0] / steps,
        "step_ms_first_10pct": first_ms,
        "step_ms_last_10pct": last_ms,
        "step_time_drift": last_ms / first_ms - 1,
        "wall_s": samples[-1][0],
    }


def _finite(x) -> bool:
    return x == x and abs(x) != float("inf")


def _slope(points) -> float:
    """Least-squares slope of y on x."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--log_every", type=int, default=100)
    parser.add_argument("--checkpoint_every", type=int, default=1000)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--workdir", default="/tmp/byol_soak")
    parser.add_argument("--out", default=None, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from byol_jax import monitor  # noqa: PLC0415 (after XLA_FLAGS)
    from byol_jax.programs import pretraining  # noqa: PLC0415

    monitor.setup_logging()
    shutil.rmtree(args.workdir, ignore_errors=True)
    config = soak_config(args.steps, args.log_every, args.checkpoint_every)
    sampler = MemorySampler()
    sampler.start()
    pretraining.train_and_evaluate(config, args.workdir)
    samples = sampler.stop()
    rows = monitor.read_metrics(args.workdir)
    figures = analyse(rows, samples, config.batch_size, args.steps)
    figures["devices"] = args.devices
    figures["rss_trace_mb"] = [
        [round(t), round(m, 1)] for t, m in samples[:: max(1, len(samples) // 20)]
    ]
    print(json.dumps(figures, indent=2))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if figures["loss_finite"] and figures["steps"] == args.steps else 1


if __name__ == "__main__":
    sys.exit(main())
