"""Step time as the batch and the number of devices grow (forced host devices on the CPU).

    python benchmarks/scaling.py --encoder tiny --image-size 32 --batches 64 128 256 --devices 1 2 4 8

Each device count runs in its own process (XLA's host device count is fixed at start-up),
through benchmarks/throughput.py. Prints a table of images/s and milliseconds per image: the
cost per image should stay flat as the batch grows, and the last column compares
cross-replica BatchNorm with per-device BatchNorm at the same device count, which shows the
cost of its collectives. On a CPU the forced devices share the same cores, so more devices
do not make it faster; the figures show overheads, not speed-ups.
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run(devices, batch, sync, args):
    env = dict(os.environ)
    if args.force_host_devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    command = [
        sys.executable,
        os.path.join(HERE, "throughput.py"),
        "--encoder",
        args.encoder,
        "--image-size",
        str(args.image_size),
        "--batch",
        str(batch),
        "--devices",
        str(devices),
        "--steps",
        str(args.steps),
        "--warmup",
        "1",
        "--sync-batchnorm",
        sync,
        "--num-filters",
        str(args.num_filters),
        "--dtype",
        args.dtype,
        "--mode",
        args.mode,
    ]
    if args.cifar_stem:
        command.append("--cifar-stem")
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--encoder", default="tiny")
    p.add_argument("--num-filters", type=int, default=16)
    p.add_argument("--cifar-stem", action="store_true")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--mode", default="shard_map", choices=["shard_map", "pmap"])
    p.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--no-force-host-devices", dest="force_host_devices", action="store_false")
    args = p.parse_args(argv)
    rows = []
    print(
        f"{'devices':>7} {'batch':>6} {'images/s':>9} {'ms/image':>9} {'per-device BN ms/image':>23}"
    )
    for devices in args.devices:
        for batch in args.batches:
            if batch % devices:
                continue
            synced = run(devices, batch, "auto", args)
            local = run(devices, batch, "off", args) if devices > 1 else synced
            row = {
                "devices": devices,
                "batch": batch,
                "images_per_s": synced["images_per_s"],
                "ms_per_image": 1000 / synced["images_per_s"],
                "ms_per_image_unsynced_bn": 1000 / local["images_per_s"],
            }
            rows.append(row)
            print(
                f"{devices:>7} {batch:>6} {row['images_per_s']:>9.1f} {row['ms_per_image']:>9.3f} "
                f"{row['ms_per_image_unsynced_bn']:>23.3f}",
                flush=True,
            )
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
