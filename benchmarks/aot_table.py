"""The README's table of the paper's configs compiled ahead of time for TPU pods (no TPU):

    python benchmarks/aot_table.py [--out /tmp/aot_table]      # needs libtpu: pip install -e ".[tpu]"

Runs ``python -m byol_jax.aot`` once per (config, topology) row below, each in its own process,
and prints a Markdown table (memory per device against HBM, fits or not, FLOPs per image,
the images/s at 35 % of the vendor bf16 peak, compile time), writing every report as JSON to
--out. Each ResNet-50 compilation takes minutes on one CPU core; ResNet-200 x2 longer.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
ROWS = [
    ("ResNet-50, batch 4096", "configs/imagenet.py", "v5e:16x16", []),
    ("ResNet-50, batch 4096", "configs/imagenet.py", "v4:4x4x4", []),
    ("ResNet-50, batch 4096", "configs/imagenet.py", "v5p:4x4x4", []),
    (
        "ResNet-200 x2, batch 4096",
        "configs/imagenet.py",
        "v5p:4x4x4",
        ["--config.encoder=resnet200", "--config.width_multiplier=2"],
    ),  # fmt: skip
]


def run_row(label, config, topology, extra, out: pathlib.Path, utilisation: float) -> dict:
    path = out / f"{topology.replace(':', '_')}_{len(extra)}.json"
    command = [
        sys.executable, "-m", "byol_jax.aot", "--config", str(REPO / config), "--topology", topology,
        "--json", str(path), f"--utilisation={utilisation}", *extra,
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{label} on {topology} failed:\n{result.stderr[-3000:]}")
    print(result.stdout, flush=True)
    return {"label": label, **json.loads(path.read_text())}


def table(rows: list[dict]) -> str:
    gib = lambda n: f"{n / 2**30:.1f}"  # noqa: E731
    lines = [
        "| config | topology | devices (kind) | hosts | batch per device | memory per device, GiB (args + outputs + temps / HBM) | fits | GFLOP per image | images/s at 35 % of peak (estimate) | compile, min |",  # fmt: skip
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        memory = f"{gib(r['argument_bytes'])} + {gib(r['output_bytes'])} + {gib(r['temp_bytes'])} = {gib(r['used_bytes'])} / {gib(r['memory_bytes'])}"  # fmt: skip
        fits = "yes" if r["fits"] else f"no (about {r['batch_per_device_that_fits_estimate']} per device would)"  # fmt: skip
        lines.append(
            f"| {r['label']} | {r['topology']} | {r['devices']} ({r['device_kind']}) | "
            f"{r['processes']} | {r['batch_per_device']} | {memory} | {fits} | "
            f"{r['flops_per_image'] / 1e9:.1f} | {r['images_per_s_estimate']:,.0f} | "
            f"{r['compile_s'] / 60:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", default="/tmp/aot_table")
    p.add_argument("--utilisation", type=float, default=0.35)
    p.add_argument("--only", type=int, nargs="*", help="row numbers to run (default: all)")
    args = p.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [row for i, row in enumerate(ROWS) if args.only is None or i in args.only]
    rows = [run_row(*row, out, args.utilisation) for row in chosen]
    print(table(rows))
    (out / "table.md").write_text(table(rows) + "\n")


if __name__ == "__main__":
    main()
