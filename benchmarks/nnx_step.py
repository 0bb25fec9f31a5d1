"""Step time of the BYOL step with an NNX encoder against the same network in Linen.

    python benchmarks/nnx_step.py [--batch 128 --image-size 32 --width 32 --rounds 5]

The network (conv-BatchNorm-ReLU x 3 with strides 1, 2, 2, global pooling) is written three
ways: a Linen module, an NNX module through byol_jax's own adapter (``nnx.split`` once, then
``nnx.merge`` inside the traced step), and the same NNX class wrapped by
``flax.nnx.bridge.ToLinen``. Each variant is compiled ahead of time, then the variants are
timed in alternation, ``--rounds`` times, so that load on the machine hits all alike; the
median per variant and the ratios to Linen are printed. Not a test: timings depend on the
machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import byol_jax
from byol_jax import augment


class LinenNet(nn.Module):
    width: int = 32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = True):
        for i, stride in enumerate((1, 2, 2)):
            x = nn.Conv(self.width * 2**i, (3, 3), stride, use_bias=False, name=f"conv{i}")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.axis_name, name=f"bn{i}")(x)  # fmt: skip
            x = nn.relu(x)
        return jnp.mean(x, axis=(1, 2))


class NnxNet(nnx.Module):
    def __init__(self, width: int = 32, *, rngs: nnx.Rngs):
        widths = [3] + [width * 2**i for i in range(3)]
        self.convs = nnx.List(
            [nnx.Conv(widths[i], widths[i + 1], (3, 3), strides=s, use_bias=False, rngs=rngs)
             for i, s in enumerate((1, 2, 2))]
        )  # fmt: skip
        self.norms = nnx.List([nnx.BatchNorm(w, momentum=0.9, rngs=rngs) for w in widths[1:]])

    def __call__(self, x):
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = nnx.relu(norm(conv(x)))
        return jnp.mean(x, axis=(1, 2))


def encoders(width: int) -> dict:
    return {
        "linen": LinenNet(width),
        "nnx": NnxNet(width, rngs=nnx.Rngs(0)),
        "nnx_bridge_tolinen": nnx.bridge.ToLinen(NnxNet, args=(width,)),
    }


def compiled_step(encoder, images, size):
    view1, view2 = augment.recipe("byol_cifar", size)
    learner = byol_jax.BYOL(
        encoder, image_size=size, projection_size=256, projection_hidden_size=1024,
        augment_fn=view1, augment_fn2=view2,
    )  # fmt: skip
    state = learner.init(jax.random.key(0), images, optax.adam(1e-3))
    start = time.perf_counter()
    step = jax.jit(learner.train_step, donate_argnums=0).lower(state, images, jax.random.key(0)).compile()  # fmt: skip
    return step, state, time.perf_counter() - start


def time_steps(step, state, images, steps):
    state, metrics = step(state, images, jax.random.key(0))  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(steps):
        state, metrics = step(state, images, jax.random.key(i + 1))
    jax.block_until_ready(metrics)
    return state, (time.perf_counter() - start) / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, args.image_size, args.image_size, 3), np.uint8)
    compiled = {}
    for name, encoder in encoders(args.width).items():
        step, state, seconds = compiled_step(encoder, images, args.image_size)
        compiled[name] = [step, state]
        print(f"{name}: compiled in {seconds:.1f} s", flush=True)
    times = {name: [] for name in compiled}
    for _ in range(args.rounds):
        for name, (step, state) in compiled.items():
            compiled[name][1], seconds = time_steps(step, state, images, args.steps)
            times[name].append(seconds)
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, seconds in median.items():
        ratio = seconds / median["linen"]
        print(f"{name}: {1e3 * seconds:.1f} ms/step, {args.batch / seconds:.1f} images/s, {ratio:.3f} x Linen's time")  # fmt: skip
    result = {"median_s": median, "all_s": times, "args": vars(args), "jax": jax.__version__}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
