"""Throughput of the on-device views: images/s for both views, against torchvision.

Measures, at each image size, both views of the ``byol`` recipe (and of the ``seed``
recipe) jitted on the default JAX backend, with compile time reported apart. With
``--torch-python`` it also times byol-pytorch's default augmentation (torchvision) in a
subprocess of that interpreter, both as the seed runs it (one draw per batch) and per
image, and prints the ratio. With ``byol_jax.networks`` importable it times the encoder's
forward + backward pass on both views and prints the augmentation's share of it.

    python benchmarks/augment_throughput.py --sizes 32 224 --batch 64 --iters 5 \
        --torch-python /work/torchenv/bin/python

At 32 px the device takes the CIFAR route (random resized crop on device); at 224 px the
ImageNet route (the host crops, ``crop=False``; ``--device-crop`` crops from 256 px on
device instead).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from byol_jax import augment

# byol-pytorch 0.8.2's DEFAULT_AUG (byol_pytorch.py, BYOL.__init__), rebuilt verbatim.
_TORCH_SCRIPT = r"""
import json, sys, time
import torch
from torch import nn
import torchvision.transforms as T

size, batch, iters = (int(v) for v in sys.argv[1:4])

class RandomApply(nn.Module):
    def __init__(self, fn, p):
        super().__init__()
        self.fn, self.p = fn, p
    def forward(self, x):
        return x if torch.rand(()) > self.p else self.fn(x)

aug = nn.Sequential(
    RandomApply(T.ColorJitter(0.8, 0.8, 0.8, 0.2), p=0.3),
    T.RandomGrayscale(p=0.2),
    T.RandomHorizontalFlip(),
    RandomApply(T.GaussianBlur((3, 3), (1.0, 2.0)), p=0.2),
    T.RandomResizedCrop((size, size)),
    T.Normalize(mean=torch.tensor([0.485, 0.456, 0.406]), std=torch.tensor([0.229, 0.224, 0.225])),
)
images = torch.rand(batch, 3, size, size)

def per_batch():  # as the seed runs it: one draw for the whole batch, per view
    return aug(images), aug(images)

def per_image():  # the correct behaviour: one draw per image, per view
    return [aug(x) for x in images], [aug(x) for x in images]

result = {"threads": torch.get_num_threads()}
with torch.no_grad():
    for name, fn in (("per_batch", per_batch), ("per_image", per_image)):
        fn()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        result[name] = batch * iters / (time.perf_counter() - start)
print(json.dumps(result))
"""


def time_views(views, images: np.ndarray, iters: int) -> tuple[float, float, float]:
    """Both views of ``images`` under one jit.

    Returns:
      (compile seconds, images/s, seconds per batch) where an image yields both views.
    """
    view1, view2 = views

    def both(key, batch):
        key1, key2 = jax.random.split(key)
        return view1(key1, batch), view2(key2, batch)

    images = jnp.asarray(images)
    start = time.perf_counter()
    compiled = jax.jit(both).lower(jax.random.key(0), images).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(jax.random.key(1), images))
    start = time.perf_counter()
    for step in range(iters):
        out = compiled(jax.random.key(step + 2), images)
    jax.block_until_ready(out)
    seconds = (time.perf_counter() - start) / iters
    return compile_s, images.shape[0] / seconds, seconds


def time_torch(python: str, size: int, batch: int, iters: int) -> dict | None:
    """The seed's torchvision pipeline in a subprocess; None (with a message) on failure."""
    cmd = [python, "-c", _TORCH_SCRIPT, str(size), str(batch), str(iters)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"  torchvision run failed ({python}):\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_encoder(size: int):
    """ResNet-18 (3x3 stem) at CIFAR sizes, ResNet-50 otherwise; None without networks."""
    try:
        from byol_jax import networks
    except ImportError as error:
        print(f"  encoder timing skipped: byol_jax.networks unavailable ({error})")
        return None
    if size <= 64:
        return "ResNet-18 (3x3 stem)", networks.ResNet18(cifar_stem=True)
    return "ResNet-50", networks.ResNet50()


def time_encoder(model, views: jax.Array, iters: int) -> tuple[float, float]:
    """Forward + backward of the encoder on ``views`` [2N, S, S, 3] in training mode.

    Returns:
      (compile seconds, seconds per batch).
    """
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=True))(views[:2])

    def loss(params, batch_stats, x):
        out, _ = model.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.mean(out**2)

    grad = jax.jit(jax.grad(loss))
    args = (variables["params"], variables["batch_stats"], views)
    start = time.perf_counter()
    compiled = grad.lower(*args).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))
    start = time.perf_counter()
    for _ in range(iters):
        out = compiled(*args)
    jax.block_until_ready(out)
    return compile_s, (time.perf_counter() - start) / iters


def bench_jax(size: int, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """Both views of ``byol`` and ``seed``; returns {recipe: (images/s, seconds/batch)}."""
    device_crop = size <= 64 or args.device_crop
    byol_input = size if size <= 64 else (256 if device_crop else size)
    route = "crop on device" if device_crop else "host-cropped input, crop=False"
    # The seed's pipeline crops as torchvision does below: on device, from size px input.
    runs = {"byol": (byol_input, device_crop, route), "seed": (size, True, "crop on device")}
    rng = np.random.default_rng(0)
    rates = {}
    for name, (in_size, crop, route) in runs.items():
        images = rng.integers(0, 256, (args.batch, in_size, in_size, 3), dtype=np.uint8)
        views = augment.recipe(name, size, crop=crop)
        compile_s, rate, seconds = time_views(views, images, args.iters)
        rates[name] = (rate, seconds)
        print(
            f"  jax {name:5s} both views: {rate:9.1f} images/s  (compile {compile_s:.1f} s; "
            f"{in_size} px input, {route})"
        )
    return rates


def bench_torch(size: int, args: argparse.Namespace, rates: dict) -> None:
    torch = time_torch(args.torch_python, size, args.batch, args.iters)
    if torch is None:
        return
    for mode in ("per_batch", "per_image"):
        print(
            f"  torchvision seed pipeline, {mode}: {torch[mode]:9.1f} images/s "
            f"({torch['threads']} threads)"
        )
    for name in ("byol", "seed"):
        for mode in ("per_batch", "per_image"):
            print(f"  ratio jax {name} / torchvision {mode}: {rates[name][0] / torch[mode]:6.2f}")


def bench_encoder(size: int, args: argparse.Namespace, rates: dict) -> None:
    encoder = make_encoder(size)
    if encoder is None:
        return
    label, model = encoder
    views = jnp.zeros((2 * args.encoder_batch, size, size, 3), jnp.float32)
    compile_s, seconds = time_encoder(model, views, args.encoder_iters)
    encoder_per_image = seconds / args.encoder_batch
    augment_per_image = rates["byol"][1] / args.batch
    print(
        f"  {label} forward+backward on both views: {1 / encoder_per_image:9.1f} images/s "
        f"(batch {args.encoder_batch}, compile {compile_s:.1f} s)"
    )
    share = augment_per_image / encoder_per_image
    print(f"  byol augmentation cost / encoder forward+backward: {share:.1%}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument(
        "--device-crop",
        action="store_true",
        help="at sizes above 64 px, crop on device from 256 px inputs",
    )
    parser.add_argument(
        "--torch-python",
        default=None,
        help="python with torch + torchvision, to time the seed's pipeline",
    )
    parser.add_argument("--no-encoder", dest="encoder", action="store_false")
    parser.add_argument("--encoder-batch", type=int, default=16)
    parser.add_argument("--encoder-iters", type=int, default=2)
    args = parser.parse_args(argv)
    print(
        f"JAX {jax.__version__} on {jax.default_backend()} "
        f"({jax.devices()[0].device_kind}, {jax.device_count()} device(s))"
    )
    for size in args.sizes:
        print(f"\n== {size} px, batch {args.batch}")
        rates = bench_jax(size, args)
        if args.torch_python:
            bench_torch(size, args, rates)
        if args.encoder:
            bench_encoder(size, args, rates)


if __name__ == "__main__":
    main()
