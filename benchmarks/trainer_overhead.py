"""The trainer end to end against its bare step, on the CPU, with where the trainer's time goes.

    python benchmarks/trainer_overhead.py --source arrays
    python benchmarks/trainer_overhead.py --source folder [--folder DIR]

Both sides run the same network and step: ``configs/cifar10.py`` with ResNet-18 of base
width ``--num-filters`` (16), 32 px, batch 128, Adam 3e-4, the seed's views, both views in
one BatchNorm batch, and the config's online probe. The *trainer* is
``byol_jax.programs.pretraining.train_and_evaluate`` as ``python -m byol_jax.train`` runs
it (its input pipeline, device prefetch, loop, metric fetches); its rate is the median of the
``images_per_s`` it logs, the first interval (compilation) left out. The *bare step* is the
same learner's mapped ``train_step`` on one batch already on the device. The two are timed in
alternation ``--rounds`` times in one process and the median ratio is printed.

For the trainer it also prints, per step, the time the loop's thread spent waiting for the
next host batch (the input pipeline), putting it on the device (transfer), and the CPU time
the whole process used against the bare step's: on a CPU the input pipeline's threads share
the cores with XLA, so its cost shows as extra CPU time rather than as waiting.

Sources: ``arrays`` (random uint8 images in memory; no TensorFlow), ``folder`` (JPEG files
read by tf.data: the CIFAR-10 JPEGs of ../shared/data when present, else a folder of random
32x32 JPEGs made here, or ``--folder``). Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import statistics
import sys
import tarfile
import tempfile
import time

import jax
import numpy as np

from byol_jax import host_memory, monitor, parallel
from byol_jax.programs import pretraining

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"
sys.path.insert(0, str(ROOT))
from configs import cifar10  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--source", default="arrays", choices=["arrays", "folder"])
    p.add_argument("--folder", default="", help="a folder of train/<label>/*.jpg")
    p.add_argument("--num-filters", type=int, default=16)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--log-every", type=int, default=10, help="steps per logged interval")
    p.add_argument("--intervals", type=int, default=3, help="timed intervals per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--examples", type=int, default=5120, help="images of the arrays source")
    return p.parse_args(argv)


def make_config(args, folder: str):
    config = cifar10.get_config()
    if args.source == "folder":
        config.data.source, config.data.folder = "folder", folder
    else:
        config.data.source = "arrays"
    config.num_filters = args.num_filters
    config.batch_size = args.batch
    config.optimizer, config.base_learning_rate = "adam", 3e-4 * args.batch / 256
    config.weight_decay, config.warmup_epochs = 0.0, 0
    config.augment.name = "seed"
    config.views_in_one_batch = True
    config.total_steps = args.log_every * (1 + args.intervals)
    config.log_every = args.log_every
    config.checkpoint_every = 10**9  # the one checkpoint at the end, after the last interval
    config.knn_at_end = False
    config.progress_bar = False
    return config


def random_arrays(args) -> dict:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.examples, 32, 32, 3), dtype=np.uint8)
    return {"train": {"images": images, "labels": rng.integers(0, 10, args.examples)}}


@contextlib.contextmanager
def cifar_folder(args):
    """The folder the folder source reads: --folder, the shared CIFAR-10 JPEGs, or made here."""
    if args.folder:
        yield args.folder
        return
    with tempfile.TemporaryDirectory() as root:
        if SHARED_CIFAR.exists():
            with tarfile.open(SHARED_CIFAR) as tar:
                members = [m for m in tar.getmembers() if m.name.endswith(".jpg")]
                tar.extractall(root, [m for m in members if "/train/" in f"/{m.name}"], filter="data")  # fmt: skip
            yield str(next(pathlib.Path(root).rglob("train")).parent)
        else:
            print(f"{SHARED_CIFAR} is absent: timing a folder of random 32x32 JPEGs made here")
            yield make_jpeg_folder(pathlib.Path(root), args.examples)


def make_jpeg_folder(root: pathlib.Path, count: int) -> str:
    from PIL import Image  # noqa: PLC0415 (only without the shared images)

    rng = np.random.default_rng(0)
    for i in range(count):
        label = root / "train" / f"class{i % 10}"
        label.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(label / f"{i:05d}.jpg", quality=75)
    return str(root)


class Timers:
    """Seconds the loop's thread spends in the host pipeline and in device puts, and the
    process's CPU time, read at every logged interval."""

    def __init__(self):
        self.pipeline = self.transfer = 0.0
        self.marks = []  # at each write: (wall, cpu, pipeline, transfer)

    @contextlib.contextmanager
    def installed(self):
        # Wraps three calls the trainer makes (a benchmark may patch; the library never does).
        batches, shard = pretraining.datasets.pretrain_batches, parallel.Replicas.shard
        write = monitor.MetricWriter.write

        def timed_batches(*a, **k):
            iterator = batches(*a, **k)
            while True:
                start = time.perf_counter()
                batch = next(iterator)
                self.pipeline += time.perf_counter() - start
                yield batch

        def timed_shard(replicas, batch):
            start = time.perf_counter()
            out = shard(replicas, batch)
            self.transfer += time.perf_counter() - start
            return out

        def timed_write(writer, step, metrics):
            cpu = os.times()
            self.marks.append((time.perf_counter(), cpu.user + cpu.system, self.pipeline, self.transfer))  # fmt: skip
            return write(writer, step, metrics)

        pretraining.datasets.pretrain_batches = timed_batches
        parallel.Replicas.shard, monitor.MetricWriter.write = timed_shard, timed_write
        try:
            yield self
        finally:
            pretraining.datasets.pretrain_batches = batches
            parallel.Replicas.shard, monitor.MetricWriter.write = shard, write


def time_trainer(config, arrays) -> dict:
    """One trainer run: its steady intervals' (all but the first) images/s and costs."""
    with tempfile.TemporaryDirectory() as workdir, Timers().installed() as timers:
        pretraining.train_and_evaluate(config, workdir, arrays)
        rows = [r for r in monitor.read_metrics(workdir) if "images_per_s" in r]
    (wall0, cpu0, pipe0, put0), (wall1, cpu1, pipe1, put1) = timers.marks[0], timers.marks[-1]
    steps = config.total_steps - config.log_every
    return {
        "images_per_s": statistics.median(r["images_per_s"] for r in rows[1:]),
        "pipeline_ms_per_step": 1e3 * (pipe1 - pipe0) / steps,
        "transfer_ms_per_step": 1e3 * (put1 - put0) / steps,
        "cpu_s_per_wall_s": (cpu1 - cpu0) / (wall1 - wall0),
    }


def bare_step(config, arrays, steps: int):
    """The trainer's own learner and step on one device-resident batch: a timing function."""
    with tempfile.TemporaryDirectory() as workdir:  # setup only checks it
        run = pretraining.setup(config, workdir, arrays)
    batch = next(
        pretraining.datasets.pretrain_batches(
            config.data,
            global_batch_size=config.batch_size,
            image_size=config.image_size,
            seed=0,
            arrays=arrays,
        )
    )
    images, labels = run.replicas.shard(batch["images"]), run.replicas.shard(batch["labels"])
    state = run.replicas.replicate(run.learner.init(jax.random.key(0), batch["images"][:2], run.tx))  # fmt: skip
    step = run.replicas.map(run.learner.train_step)
    carry = [state, None]

    def timed() -> dict:
        cpu_start, start = os.times(), time.perf_counter()
        for i in range(steps):
            carry[0], carry[1] = step(carry[0], images, jax.random.key(i), labels)
        jax.block_until_ready(carry[1])
        wall, cpu = time.perf_counter() - start, os.times()
        used = cpu.user + cpu.system - cpu_start.user - cpu_start.system
        return {"images_per_s": steps * config.batch_size / wall, "cpu_s_per_wall_s": used / wall}

    timed()  # compile and warm up
    return timed


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not jax.config.jax_compilation_cache_dir:  # the trainer compiles its step every round
        jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp())
    arrays = random_arrays(args) if args.source == "arrays" else None
    with cifar_folder(args) as folder:
        config = make_config(args, folder)
        bare = bare_step(config, arrays, args.log_every * args.intervals)
        rounds = []
        for r in range(args.rounds):
            trainer, step = time_trainer(config, arrays), bare()
            ratio = trainer["images_per_s"] / step["images_per_s"]
            rounds.append({"trainer": trainer, "bare_step": step, "ratio": ratio})
            print(
                f"round {r + 1}: trainer {trainer['images_per_s']:.1f} images/s, bare step "
                f"{step['images_per_s']:.1f}, ratio {ratio:.2f}; trainer per step: pipeline "
                f"{trainer['pipeline_ms_per_step']:.1f} ms, transfer "
                f"{trainer['transfer_ms_per_step']:.1f} ms; CPU cores busy: trainer "
                f"{trainer['cpu_s_per_wall_s']:.2f}, bare step {step['cpu_s_per_wall_s']:.2f}"
            )
    result = {
        "source": args.source,
        "num_filters": args.num_filters,
        "batch": args.batch,
        "median_ratio": statistics.median(r["ratio"] for r in rounds),
        "rounds": rounds,
    }
    print(
        f"{args.source}: trainer / bare step, median of {args.rounds}: {result['median_ratio']:.2f}"
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    host_memory.configure_for_run()  # as `python -m byol_jax.train` does, before JAX starts
    main()
