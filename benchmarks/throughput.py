"""Images/s of the full BYOL train step (augmentation, online forward/backward, target forward,
LARS update, EMA) on the current backend, compile time apart.

    python benchmarks/throughput.py --encoder resnet18 --cifar-stem --image-size 32 --batch 128
    python benchmarks/throughput.py ... --compare-seed --torch-python /path/to/venv-with-torch/bin/python

Prints one line per setting and a JSON line with everything: images/s, step time, compile
time, peak memory (host RSS on the CPU, device memory on GPU/TPU), XLA's FLOPs per image and,
on an accelerator with a known peak, the achieved fraction of it (MFU). ``--compare-seed``
runs byol-pytorch 0.8.2 (benchmarks/seed_step.py) on the same network (ResNet-18/50 with
``--num-filters`` base channels) and batch in a subprocess and prints the ratio; with
``--rounds R`` the two are timed in alternation R times, so that load on the machine hits
both alike, and the median ratio is reported. ``--optimizer adam --recipe seed
--views-in-one-batch`` is the seed's own step (Adam 3e-4, its views, one BatchNorm batch).
Not a test: timings depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import byol_jax
from byol_jax import augment, hardware, host_memory, networks, optim, parallel


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--encoder", default="resnet18", help="resnet18 ... resnet200, or tiny")
    p.add_argument("--width", type=int, default=1, help="width multiplier")
    p.add_argument("--num-filters", type=int, default=64)
    p.add_argument("--cifar-stem", action="store_true")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=128, help="global batch")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--devices", type=int, default=1, help="devices to map the step over (pmap)")
    p.add_argument("--mode", default="shard_map", choices=["pmap", "shard_map"])
    p.add_argument(
        "--conv-chunk",
        default="auto",
        help="images per convolution call: auto (16 on the CPU), none, or a number",
    )
    p.add_argument("--recipe", default="byol_cifar", help="augmentation recipe")
    p.add_argument(
        "--views-in-one-batch", action="store_true", help="the seed's shared BatchNorm batch"
    )
    p.add_argument("--sync-batchnorm", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--compare-seed", action="store_true", help="also run byol-pytorch 0.8.2")
    p.add_argument(
        "--torch-python", default=sys.executable, help="python with torch + byol-pytorch"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads for --compare-seed")
    p.add_argument("--optimizer", default="lars", choices=["lars", "adam"], help="adam: 3e-4")
    p.add_argument("--rounds", type=int, default=1, help="timings, alternating with the seed")
    return p.parse_args(argv)


def build(args):
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    encoder = networks.encoder_by_name(
        args.encoder,
        width_multiplier=args.width,
        num_filters=args.num_filters,
        cifar_stem=args.cifar_stem,
        dtype=dtype,
        conv_chunk=_conv_chunk(args.conv_chunk),
    )
    view1, view2 = augment.recipe(args.recipe, args.image_size)
    learner = byol_jax.BYOL(
        encoder,
        image_size=args.image_size,
        augment_fn=view1,
        augment_fn2=view2,
        views_in_one_batch=args.views_in_one_batch,
        dtype=dtype,
        sync_batchnorm={"auto": None, "on": True, "off": False}[args.sync_batchnorm],
    )
    if args.optimizer == "adam":  # the seed's README optimiser
        return learner, optax.adam(3e-4)
    schedule = optim.learning_rate_schedule(
        0.2, batch_size=args.batch, total_steps=10_000, warmup_steps=100
    )
    tx = optim.create_optimizer("lars", schedule, weight_decay=1.5e-6)
    return learner, tx


def _conv_chunk(text: str):
    named = {"auto": "auto", "none": None}
    return named[text] if text in named else int(text)


def compile_step(args):
    """The step the flags describe, mapped over ``args.devices`` and compiled ahead of time
    (one compilation gives the executable and XLA's own figures): (replicas, compiled step,
    replicated state, sharded images, compile seconds)."""
    learner, tx = build(args)
    replicas = parallel.Replicas(
        args.mode, learner.axis_name, devices=jax.devices()[: args.devices]
    )
    replicas.check_batch_size(args.batch)
    images = random_images(args)
    state = replicas.replicate(learner.init(jax.random.key(0), images[:2], tx))
    images = replicas.shard(images)
    start = time.perf_counter()
    step = replicas.mapped(learner.train_step).lower(state, images, jax.random.key(0)).compile()
    return replicas, step, state, images, time.perf_counter() - start


def measure(args) -> tuple[dict, object]:
    """Compiles and warms the step; returns the figures of one timing and a function that
    times ``args.steps`` more steps (seconds per step)."""
    replicas, step, rstate, rimages, compile_s = compile_step(args)
    flops = _flops_per_image(step, args.batch // replicas.num_replicas)
    rstate, metrics = step(rstate, rimages, jax.random.key(0))
    for i in range(args.warmup):
        rstate, metrics = step(rstate, rimages, jax.random.key(i + 1))
    jax.block_until_ready(metrics)
    carry = {"state": rstate, "metrics": metrics}

    def time_steps() -> float:
        start = time.perf_counter()
        for i in range(args.steps):
            carry["state"], carry["metrics"] = step(
                carry["state"], rimages, jax.random.key(i + 100)
            )
        jax.block_until_ready(carry["metrics"])
        return (time.perf_counter() - start) / args.steps

    step_s = time_steps()
    metrics = carry["metrics"]
    result = {
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "devices": replicas.num_replicas,
        "encoder": args.encoder,
        "width": args.width,
        "num_filters": args.num_filters,
        "cifar_stem": args.cifar_stem,
        "image_size": args.image_size,
        "batch": args.batch,
        "dtype": args.dtype,
        "mode": args.mode,
        "conv_chunk": networks.conv_chunk_for_backend(_conv_chunk(args.conv_chunk)),
        "sync_batchnorm": args.sync_batchnorm,
        "optimizer": args.optimizer,
        "images_per_s": args.batch / step_s,
        "step_time_s": step_s,
        "compile_s": compile_s,
        "flops_per_image": flops,
        "peak_memory_gb": _peak_memory_gb(),
        "loss": float(replicas.fetch(metrics)["loss"]),
    }
    # MFU against the vendor's dense bf16 peak (byol_jax.hardware), not a measured rate.
    facts = hardware.device_facts(result["device"])
    if facts and flops:
        result["mfu"] = flops * result["images_per_s"] / (facts.bf16_flops * replicas.num_replicas)
    return result, time_steps


def random_images(args) -> np.ndarray:
    """The one fixed uint8 batch every timed step reads (no data loading is measured)."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (args.batch, args.image_size, args.image_size, 3), dtype=np.uint8)


def _flops_per_image(compiled, per_device_batch):
    """XLA's own count for one replica's step, per image (None where the backend has none)."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        return float(cost["flops"]) / per_device_batch
    except Exception:  # noqa: BLE001 (cost analysis is optional and backend-dependent)
        return None


def _peak_memory_gb():
    if jax.default_backend() == "cpu":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**30


def run_seed(args) -> dict | None:
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seed_step.py")
    arch = args.encoder if args.encoder in ("resnet18", "resnet50") else None
    if arch is None:
        print(
            f"--compare-seed: byol-pytorch is measured for resnet18/resnet50 only, not {args.encoder}"
        )
        return None
    command = [
        args.torch_python,
        script,
        "--arch",
        arch,
        "--image-size",
        str(args.image_size),
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--width",
        str(args.num_filters),
        "--threads",
        str(args.threads),
        "--json",
        "--cifar-stem" if args.cifar_stem else "--no-cifar-stem",
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(
            f"--compare-seed failed (is torch + byol-pytorch installed for {args.torch_python}?):\n"
            f"{done.stderr[-2000:]}"
        )
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    result, time_steps = measure(args)
    print(_describe(args, result))
    if args.compare_seed:
        compare_with_seed(args, result, time_steps)
    print(json.dumps(result))
    return result


def _describe(args, result) -> str:
    line = (
        f"byol_jax {args.encoder} {args.image_size}px batch {args.batch} {args.dtype} on "
        f"{result['devices']}x {result['device']}: {result['images_per_s']:.1f} images/s "
        f"({result['step_time_s'] * 1000:.0f} ms/step), compile {result['compile_s']:.1f} s, "
        f"peak memory {result['peak_memory_gb']:.2f} GB"
    )
    if result["flops_per_image"]:
        line += f", {result['flops_per_image'] / 1e9:.2f} GFLOP/image"
    if "mfu" in result:
        line += f", MFU {100 * result['mfu']:.1f} %"
    return line


def compare_with_seed(args, result: dict, time_steps) -> None:
    """byol-pytorch's images/s in alternation with byol_jax's, `args.rounds` times; the
    result gains both series and the median ratio."""
    ours, seeds = [result["images_per_s"]], []
    for round_index in range(args.rounds):
        if round_index:
            ours.append(args.batch / time_steps())
        seed = run_seed(args)
        if not seed:
            return
        seeds.append(seed["images_per_s"])
        print(
            f"round {round_index + 1}: byol_jax {ours[-1]:.1f}, byol-pytorch 0.8.2 "
            f"{seeds[-1]:.1f} images/s, ratio {ours[-1] / seeds[-1]:.2f}"
        )
    ratios = [a / b for a, b in zip(ours, seeds, strict=True)]
    result.update(
        images_per_s_rounds=ours,
        seed_images_per_s_rounds=seeds,
        seed_images_per_s=statistics.median(seeds),
        ratio_vs_seed=statistics.median(ratios),
    )
    print(f"byol_jax / byol-pytorch, median of {len(ratios)}: {result['ratio_vs_seed']:.2f}")


if __name__ == "__main__":
    # As `python -m byol_jax.train` does before JAX starts (BYOL_JAX_KEEP_HOST_MEMORY=0: not).
    host_memory.configure_for_run()
    main()
