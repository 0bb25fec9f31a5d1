"""Host input-pipeline throughput, in images per second per CPU core.

Two cases, each with tf.data limited to N threads (options.threading.private_threadpool_size):
  (a) ImageNet-like: JPEG decode of 500x375 images + two random-resized crops to 224 px (the
      BYOL views, `host_crop=True`), from a synthetic folder of JPEGs made here with PIL;
  (b) CIFAR-10 from the shared JPEG folder (../shared/data/cifar10-jpeg.tar.gz, extracted to a
      temporary directory; skipped when absent): decode of 32x32 JPEGs as they are.
Then: how many host cores feed one H200 at 2,600 ResNet-50 BYOL images/s (an estimate: docs/results.md#reference-points-for-speed).

Run: python benchmarks/input_throughput.py [--threads 1 2] [--seconds 10]
On a shared machine the figures are noisy: read them as orders of magnitude.
"""

import argparse
import os
import pathlib
import tarfile
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from byol_jax import data as datasets  # noqa: E402

H200_IMAGES_PER_S = 2600
SHARED_CIFAR = (
    pathlib.Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-jpeg.tar.gz"
)


def make_jpeg_folder(root: pathlib.Path, count: int) -> None:
    """`count` 500x375 JPEGs (quality 90) of smooth random scenes with some texture."""
    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = rng.integers(0, 256, (6, 8, 3), np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((500, 375), Image.BICUBIC), np.int16)
        image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / f"{i:04d}.jpg", quality=90)


def extract_cifar_train(root: pathlib.Path) -> bool:
    if not SHARED_CIFAR.exists():
        print(f"(b) skipped: {SHARED_CIFAR} not found")
        return False
    with tarfile.open(SHARED_CIFAR) as tar:
        for member in tar:
            parts = pathlib.PurePosixPath(member.name).parts
            if member.isfile() and len(parts) == 3 and parts[0] == "train":
                (root / parts[0] / parts[1]).mkdir(parents=True, exist_ok=True)
                (root / member.name).write_bytes(tar.extractfile(member).read())
    return True


def throughput(batches, batch_size: int, seconds: float) -> tuple[float, float]:
    """(examples per wall second, examples per CPU second of this process) after a warm-up.

    CPU seconds count every thread of the process (tf.data's pool, the generator feeding
    file names, the numpy conversion), so the second figure is the cost of one core's work
    whatever else the machine is doing.
    """
    next(batches), next(batches)
    count, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        next(batches)
        count += batch_size
    return count / (time.perf_counter() - start), count / (time.process_time() - cpu_start)


def measure(name, data, image_size, batch_size, threads, seconds) -> None:
    for n in threads:
        data.num_threads = n
        batches = datasets.pretrain_batches(
            data, global_batch_size=batch_size, image_size=image_size, seed=0
        )
        wall, per_cpu = throughput(batches, batch_size, seconds)
        print(
            f"{name}  threads={n}: {wall:7.0f} images/s, {wall / n:7.0f} images/s/thread, "
            f"{per_cpu:7.0f} images per CPU-second -> {H200_IMAGES_PER_S / per_cpu:5.1f} cores "
            f"for {H200_IMAGES_PER_S} images/s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--jpegs", type=int, default=300)
    args = parser.parse_args()
    print(f"host: {os.cpu_count()} CPUs visible (shared machines give noisy figures)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp) / "jpeg"
        folder.mkdir()
        make_jpeg_folder(folder, args.jpegs)
        size_kb = np.mean([f.stat().st_size for f in folder.iterdir()]) / 1024
        print(
            f"(a) {args.jpegs} synthetic JPEGs, 500x375, mean {size_kb:.0f} KB (ImageNet: ~110 KB)"
        )
        data = datasets.default_data_config()
        data.update(source="folder", folder=str(folder), host_crop=True)
        name = "(a) JPEG decode + 2 random-resized crops to 224"
        measure(name, data, 224, 32, args.threads, args.seconds)
        cifar = pathlib.Path(tmp) / "cifar"
        if extract_cifar_train(cifar):
            data.update(folder=str(cifar), host_crop=False)
            measure(
                "(b) CIFAR-10 JPEG folder, decode at 32",
                data,
                32,
                256,
                args.threads,
                args.seconds,
            )


if __name__ == "__main__":
    main()
