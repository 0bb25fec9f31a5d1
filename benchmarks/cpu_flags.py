"""Which XLA CPU settings make the BYOL step fast here: each variant in its own process.

    python benchmarks/cpu_flags.py --encoder resnet18 --cifar-stem --image-size 32 --batch 128

Runs benchmarks/throughput.py once per XLA_FLAGS variant and prints images/s and the ratio to
the baseline (XLA's defaults). None of these flags gained on the development machine (README,
"Measured"), so byol_jax sets none; what did gain is in the model itself: on the CPU the
ResNets convolve the batch in slices (``networks.CPU_CONV_CHUNK``; compare with
``--conv-chunk none``).
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {
    "xla defaults": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "fast math": "--xla_cpu_enable_fast_math=true",
    "onednn + fast math": "--xla_cpu_use_onednn=true --xla_cpu_enable_fast_math=true",
    "xnnpack convolutions": "--xla_cpu_experimental_xnn_fusion_type=individual_convolution",
    "ynnpack convolutions": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution",
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=5)
    args, rest = p.parse_known_args(argv)
    results = {}
    for name, flags in VARIANTS.items():
        env = dict(os.environ, XLA_FLAGS=flags)
        done = subprocess.run(
            [
                sys.executable,
                os.path.join(HERE, "throughput.py"),
                "--steps",
                str(args.steps),
                *rest,
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr[-1500:]}")
            continue
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        base = results.get("xla defaults", results[name])["images_per_s"]
        r = results[name]
        print(
            f"{name:>20}: {r['images_per_s']:7.1f} images/s ({r['images_per_s'] / base:.2f}x), "
            f"compile {r['compile_s']:.1f} s",
            flush=True,
        )
    print(json.dumps({k: v["images_per_s"] for k, v in results.items()}))


if __name__ == "__main__":
    main()
