"""The prepared GPU benchmark: one script for a machine with one H200 (or any accelerator).

    python benchmarks/gpu_run.py --out results/           # on the GPU machine
    python benchmarks/gpu_run.py --tiny --out /tmp/gpu    # the same code path on a CPU, in seconds

1. ResNet-50, 224 px, bf16: the largest batch of --batches that fits (out-of-memory is caught
   and the next smaller batch tried), images/s, compile time, peak memory, XLA FLOPs per
   image and MFU against the vendor's dense bf16 peak (byol_jax.hardware); the goal is an
   estimate, about 2,600 images/s (docs/results.md#reference-points-for-speed).
2. ResNet-18 with the 3x3 stem, 32 px, bf16 and float32.
Writes results.json and results.md (a table for the README) into --out.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402

GOAL_IMAGES_PER_S = 2600


def settings(tiny):
    if tiny:
        return [
            (
                "resnet50-224-bf16",
                [
                    "--encoder",
                    "tiny",
                    "--image-size",
                    "32",
                    "--dtype",
                    "bfloat16",
                    "--recipe",
                    "byol",
                ],
                [64, 32, 16],
            ),
            ("resnet18-32-f32", ["--encoder", "tiny", "--cifar-stem", "--image-size", "16"], [16]),
        ]
    return [
        (
            "resnet50-224-bf16",
            [
                "--encoder",
                "resnet50",
                "--image-size",
                "224",
                "--dtype",
                "bfloat16",
                "--recipe",
                "byol",
            ],
            [1024, 768, 512, 384, 256, 128],
        ),
        (
            "resnet18-32-bf16",
            ["--encoder", "resnet18", "--cifar-stem", "--image-size", "32", "--dtype", "bfloat16"],
            [2048, 1024, 512],
        ),
        (
            "resnet18-32-f32",
            ["--encoder", "resnet18", "--cifar-stem", "--image-size", "32"],
            [1024, 512],
        ),
    ]


def largest_that_fits(name, flags, batches, steps):
    for batch in batches:
        try:
            args = throughput.parse_args([*flags, "--batch", str(batch), "--steps", str(steps)])
            result, _ = throughput.measure(args)
            result["name"] = name
            return result
        except Exception as error:  # noqa: BLE001 (out of memory shows as several error types)
            if "RESOURCE_EXHAUSTED" not in str(error) and "out of memory" not in str(error).lower():
                raise
            print(f"{name}: batch {batch} does not fit, trying a smaller one", flush=True)
    return {"name": name, "error": "no batch fits"}


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="results")
    p.add_argument("--tiny", action="store_true", help="tiny models: check the script on a CPU")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results = []
    for name, flags, batches in settings(args.tiny):
        result = largest_that_fits(name, flags, batches, 2 if args.tiny else args.steps)
        results.append(result)
        print(json.dumps(result), flush=True)
    lines = [
        "| setting | device | batch | images/s | compile s | peak GB | GFLOP/image | MFU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | | | {r['error']} | | | | |")
            continue
        gflop = f"{r['flops_per_image'] / 1e9:.1f}" if r.get("flops_per_image") else "n/a"
        mfu = f"{100 * r['mfu']:.1f} %" if "mfu" in r else "n/a"
        lines.append(
            f"| {r['name']} | {r['device']} | {r['batch']} | {r['images_per_s']:.0f} | "
            f"{r['compile_s']:.0f} | {r['peak_memory_gb']:.1f} | {gflop} | {mfu} |"
        )
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + f"\n\nGoal for ResNet-50: {GOAL_IMAGES_PER_S} images/s.\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
