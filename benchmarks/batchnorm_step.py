"""BatchNorm + ReLU, forward and backward, alone: byol_jax.batchnorm.BatchNorm (its gradient
written out) against flax.linen.BatchNorm followed by ReLU, differentiated by JAX.

    python benchmarks/batchnorm_step.py --shape 256 32 32 16

The shape is the quickstart's widest layer at base width 16 (both views of a batch of 128,
32 px, 16 channels). Both run in one process, alternating, on a fixed input; the median of
``--rounds`` timings of ``--steps`` calls each is printed, and their ratio. Not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from byol_jax import networks
from byol_jax.batchnorm import BatchNorm


class _FlaxBatchNormRelu(nn.Module):
    @nn.compact
    def __call__(self, x):
        norm = nn.BatchNorm(
            use_running_average=False,
            momentum=networks.BN_MOMENTUM,
            epsilon=networks.BN_EPSILON,
            use_fast_variance=False,
        )
        return nn.relu(norm(x))


def step_fn(module, x):
    """A jitted forward + backward of ``module`` on x: (new statistics, gradients)."""
    variables = module.init(jax.random.key(0), x)

    def loss(params, x):
        y, updates = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(y * x), updates

    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True)), variables["params"]


def timings(shape, steps: int, rounds: int) -> dict:
    x = jax.random.normal(jax.random.key(1), shape) * 2 + 0.5
    fns = {
        "byol_jax": step_fn(BatchNorm(relu=True), x),
        "flax": step_fn(_FlaxBatchNormRelu(), x),
    }
    for fn, params in fns.values():
        jax.block_until_ready(fn(params, x))  # compile
    seconds = {name: [] for name in fns}
    for _ in range(rounds):
        for name, (fn, params) in fns.items():
            start = time.perf_counter()
            for _ in range(steps):
                out = fn(params, x)
            jax.block_until_ready(out)
            seconds[name].append((time.perf_counter() - start) / steps)
    ms = {name: 1e3 * statistics.median(s) for name, s in seconds.items()}
    return {"shape": list(shape), **{f"{k}_ms": v for k, v in ms.items()},
            "ratio": ms["flax"] / ms["byol_jax"]}  # fmt: skip


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=4, default=[256, 32, 32, 16])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    result = timings(tuple(args.shape), args.steps, args.rounds)
    print(
        f"BatchNorm + ReLU forward and backward at {args.shape}: byol_jax "
        f"{result['byol_jax_ms']:.2f} ms, flax.linen.BatchNorm + autodiff "
        f"{result['flax_ms']:.2f} ms ({result['ratio']:.2f}x)"
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
