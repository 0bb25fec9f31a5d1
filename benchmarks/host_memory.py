"""The BYOL step on the CPU with and without byol_jax.host_memory's malloc settings.

    python benchmarks/host_memory.py --num-filters 16 --cifar-stem --recipe seed \
        --views-in-one-batch --optimizer adam --rounds 3

Takes benchmarks/throughput.py's flags (the same step). Each timing runs in a child process,
with BYOL_JAX_KEEP_HOST_MEMORY=0 (glibc's defaults: each step's temporaries in a fresh mmap)
and =1 (freed memory kept for reuse) in alternation, ``--rounds`` times. Per step each child
prints the wall time, the CPU time it used (user and system) and its page faults; and the
temporaries XLA allocates per call of the compiled step. The medians per setting and their
ratio come last, with a JSON line. Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent


def child(rest: list[str]) -> dict:
    """Runs in the child: the step compiled, warmed, then timed with its resource use."""
    from byol_jax import host_memory  # noqa: PLC0415 (before JAX starts: the setting's rule)

    kept = host_memory.configure_for_run()
    sys.path.insert(0, str(HERE))
    import jax  # noqa: PLC0415
    import throughput  # noqa: PLC0415

    args = throughput.parse_args(rest)
    _, step, state, images, _ = throughput.compile_step(args)
    temp = step.memory_analysis().temp_size_in_bytes
    for i in range(args.warmup + 1):
        state, metrics = step(state, images, jax.random.key(i))
    jax.block_until_ready(metrics)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for i in range(args.steps):
        state, metrics = step(state, images, jax.random.key(100 + i))
    jax.block_until_ready(metrics)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    per_step = lambda a, b: 1e3 * (b - a) / args.steps  # noqa: E731
    return {
        "kept": kept,
        "temp_mb": temp / 1e6,
        "wall_ms": 1e3 * wall / args.steps,
        "user_ms": per_step(before.ru_utime, after.ru_utime),
        "system_ms": per_step(before.ru_stime, after.ru_stime),
        "page_faults": (after.ru_minflt - before.ru_minflt) / args.steps,
    }


def run(setting: str, rest: list[str]) -> dict:
    env = dict(os.environ, BYOL_JAX_KEEP_HOST_MEMORY=setting)
    done = subprocess.run(
        [sys.executable, __file__, "--child", *rest], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"the child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    own, rest = parser.parse_known_args(argv)
    if own.child:
        print(json.dumps(child(rest)))
        return {}
    runs = {"0": [], "1": []}
    for round_index in range(own.rounds):
        for setting in ("0", "1"):
            r = run(setting, rest)
            runs[setting].append(r)
            print(
                f"round {round_index + 1}, keep={setting}: {r['wall_ms']:.0f} ms/step, CPU "
                f"{r['user_ms']:.0f} user + {r['system_ms']:.0f} system ms, "
                f"{r['page_faults']:.0f} page faults/step (temporaries {r['temp_mb']:.0f} MB)",
                flush=True,
            )
    medians = {s: statistics.median(r["wall_ms"] for r in rs) for s, rs in runs.items()}
    result = {"runs": runs, "median_wall_ms": medians, "speedup": medians["0"] / medians["1"]}
    print(
        f"median ms/step: {medians['0']:.0f} (glibc defaults) -> {medians['1']:.0f} (kept); "
        f"{result['speedup']:.2f}x"
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
