"""Where the BYOL step's time goes on the CPU: XLA's own per-op timings, by part and by kind.

    python benchmarks/step_profile.py --num-filters 16 --cifar-stem --image-size 32 --batch 128 \
        --recipe seed --views-in-one-batch --optimizer adam

Builds the step as benchmarks/throughput.py does (same flags), compiles it, runs ``--steps``
steps under ``jax.profiler.trace`` and reads the trace's per-thunk events (each names the
HLO instruction it ran). Each instruction is attributed from its compiled HLO: its part of
the step from the named scopes in ``byol.BYOL.train_step`` (views, online forward, online
backward, target, update, ema, probe; the rest is the loss and glue), its kind from what it
computes (convolution, matrix multiply, BatchNorm with what XLA fused into it, copies and
layout changes, other). Prints milliseconds per step for each (summed over ``--devices``),
the summed op time and the step's wall time: op times can overlap (XLA runs independent
thunks on several threads) and the wall time also holds dispatch and waits.

It also reads how busy XLA's worker threads were (``concurrency``): from the thread pool's
region markers in the trace, the time during the profiled steps with 0, 1, 2 ... workers
busy, the mean number busy, and the op time that ran while its worker was the only one busy
(a core left idle), by kind and by part. Not a test.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
import pathlib
import re
import sys
import tempfile
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import throughput  # noqa: E402 (the same builder and flags)

from byol_jax import host_memory  # noqa: E402

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^=]*? (\w[\w\-]*)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_COMMENT = re.compile(r"/\*.*?\*/")  # /*index=5*/ in long operand and tuple lists
PARTS = ("views", "target", "probe", "ema", "update", "online")


def parse_hlo(text: str) -> dict[str, dict]:
    """instruction name -> {opcode, op_name, opcodes and op names inside (for fusions)}, for
    every instruction of the compiled module. A fusion without metadata of its own takes the
    op name of the first instruction inside that has one."""
    computations, current, instructions = {}, None, {}
    for line in text.splitlines():
        if line and not line.startswith(" ") and "{" in line:
            current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            computations[current] = {"opcodes": set(), "op_names": []}
            continue
        match = _INSTRUCTION.match(_COMMENT.sub("", line))
        if not match or current is None:
            continue
        name, opcode = match.groups()
        calls, op_name = _CALLS.search(line), _OP_NAME.search(line)
        op_name = op_name.group(1) if op_name else ""
        computations[current]["opcodes"].add(opcode)
        if op_name:
            computations[current]["op_names"].append(op_name)
        instructions[name] = {
            "opcode": opcode,
            "calls": calls and calls.group(1),
            "op_name": op_name,
        }
    for info in instructions.values():
        inner = computations.get(info["calls"], {"opcodes": set(), "op_names": []})
        info["inside"] = inner["opcodes"] | {info["opcode"]}
        info["op_names"] = [info["op_name"], *inner["op_names"]]
        info["op_name"] = next((name for name in info["op_names"] if name), "")
    return instructions


def part_of(op_name: str) -> str:
    """The step's part an op belongs to, from its scope path (backward ops are JAX's
    transposes of the forward ones)."""
    scopes = re.findall(r"[\w\-]+", op_name)
    for part in PARTS:
        if part in scopes:
            if part == "online" and "transpose" in op_name:
                return "online backward"
            return "online forward" if part == "online" else part
    return "loss and glue"


def kind_of(info: dict) -> str:
    if "convolution" in info["inside"]:
        return "convolution"
    if "dot" in info["inside"]:
        return "matrix multiply"
    if any(re.search(r"BatchNorm|_bn\b", name) for name in info["op_names"]):
        return "BatchNorm"
    if info["opcode"] == "concatenate" or "transpose" in info["inside"] or "copy" in info["inside"]:
        return "copies and layout"
    return "other"


def module_ops(events, module: str) -> list[dict]:
    """The trace's per-thunk events of `module` (each names its HLO instruction)."""
    return [
        e
        for e in events
        if e.get("ph") == "X"
        and (e.get("args") or {}).get("hlo_module") == module
        and "hlo_op" in e["args"]
    ]


def op_times(ops) -> dict[str, float]:
    """Summed microseconds per HLO instruction of ``module_ops``."""
    totals = collections.Counter()
    for e in ops:
        totals[e["args"]["hlo_op"]] += e.get("dur", 0.0)
    return totals


def _trace_events(trace_dir: str) -> list[dict]:
    (path,) = pathlib.Path(trace_dir).rglob("perfetto_trace.json.gz")
    data = json.load(gzip.open(path))
    return data["traceEvents"] if isinstance(data, dict) else data


def worker_spans(events) -> dict[int, list[tuple[float, float]]]:
    """XLA's CPU worker threads (thread names with 'XLAEigen') -> their busy spans, paired
    from the thread pool's StartRegion / StopRegion markers, in trace microseconds."""
    names = {
        e["tid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    spans = {tid: [] for tid, name in names.items() if "XLAEigen" in name}
    open_at = {}
    for e in sorted(events, key=lambda e: e.get("ts", 0.0)):
        tid, name = e.get("tid"), e.get("name", "")
        if tid not in spans or e.get("ph") != "X":
            continue
        if name.endswith("::StartRegion"):
            open_at[tid] = e["ts"]
        elif name.endswith("::StopRegion") and tid in open_at:
            spans[tid].append((open_at.pop(tid), e["ts"]))
    return spans


def busy_segments(spans, start: float, stop: float) -> list[tuple[float, float, int]]:
    """[start, stop) cut where the number of busy workers changes: (from, to, busy)."""
    edges = collections.Counter()
    for intervals in spans.values():
        for a, b in intervals:
            if b <= start or a >= stop:
                continue
            edges[max(a, start)] += 1
            edges[min(b, stop)] -= 1
    segments, busy, at = [], 0, start
    for t in sorted(set(edges) | {start, stop}):
        if t > at:
            segments.append((at, min(t, stop), busy))
            at = t
        if t >= stop:
            break
        busy += edges[t]
    return segments


def concurrency(events, ops) -> dict:
    """How busy the workers were from the first of ``ops`` (``module_ops``) to the last:
    milliseconds with each number of workers busy, their mean, and per instruction the
    microseconds it ran while no other worker was busy."""
    spans = worker_spans(events)
    if not spans or not ops:
        return {"workers": len(spans), "ms_with_busy": {}, "mean_busy": 0.0, "alone_us": {}}
    start = min(e["ts"] for e in ops)
    stop = max(e["ts"] + e.get("dur", 0.0) for e in ops)
    segments = busy_segments(spans, start, stop)
    with_busy = collections.Counter()
    for a, b, busy in segments:
        with_busy[busy] += (b - a) / 1e3
    alone = [(a, b) for a, b, busy in segments if busy == 1]  # sorted, disjoint
    alone_starts = [a for a, _ in alone]
    alone_us = collections.Counter()
    for e in ops:
        a, b = e["ts"], e["ts"] + e.get("dur", 0.0)
        # Only the segments from the last one starting at or before a to those starting
        # before b can overlap [a, b).
        first = max(bisect.bisect_right(alone_starts, a) - 1, 0)
        last = bisect.bisect_left(alone_starts, b)
        alone_us[e["args"]["hlo_op"]] += sum(
            max(0.0, min(b, y) - max(a, x)) for x, y in alone[first:last]
        )
    total = sum(with_busy.values())
    return {
        "workers": len(spans),
        "ms_with_busy": dict(sorted(with_busy.items())),
        "mean_busy": sum(k * ms for k, ms in with_busy.items()) / total if total else 0.0,
        "alone_us": dict(alone_us),
    }


def profile(args) -> dict:
    _, step, state, images, _ = throughput.compile_step(args)
    instructions = parse_hlo(step.as_text())
    for i in range(args.warmup + 1):
        state, metrics = step(state, images, jax.random.key(i))
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            start = time.perf_counter()
            for i in range(args.steps):
                state, metrics = step(state, images, jax.random.key(100 + i))
            jax.block_until_ready(metrics)
            wall_ms = 1e3 * (time.perf_counter() - start) / args.steps
        module = re.search(r"HloModule ([\w.\-]+)", step.as_text()).group(1)
        events = _trace_events(trace_dir)
    ops = module_ops(events, module)
    result = summarise(instructions, op_times(ops), args.steps, wall_ms)
    busy = concurrency(events, ops)
    result["concurrency"] = summarise_concurrency(instructions, busy, args.steps)
    return result


def attribute(instructions, micros_by_name, steps):
    """Milliseconds per step by part and by kind (Counters), and those of instructions the
    compiled HLO does not hold."""
    by_part, by_kind, unknown = collections.Counter(), collections.Counter(), 0.0
    for name, micros in micros_by_name.items():
        info = instructions.get(name)
        if info is None:
            unknown += micros / 1e3 / steps
            continue
        by_part[part_of(info["op_name"])] += micros / 1e3 / steps
        by_kind[kind_of(info)] += micros / 1e3 / steps
    return by_part, by_kind, unknown


def summarise(instructions, times, steps, wall_ms) -> dict:
    by_part, by_kind, unknown = attribute(instructions, times, steps)
    return {
        "wall_ms_per_step": wall_ms,
        "op_ms_per_step": sum(by_part.values()),
        "unattributed_ms_per_step": unknown,
        "by_part": dict(by_part.most_common()),
        "by_kind": dict(by_kind.most_common()),
    }


def summarise_concurrency(instructions, busy, steps) -> dict:
    """``concurrency``'s figures per step, the lone ops' time by kind and by part."""
    by_part, by_kind, unknown = attribute(instructions, busy["alone_us"], steps)
    return {
        "workers": busy["workers"],
        "mean_busy_workers": busy["mean_busy"],
        "ms_per_step_with_busy": {k: ms / steps for k, ms in busy["ms_with_busy"].items()},
        "alone_ms_per_step": sum(by_part.values()) + unknown,
        "alone_by_part": dict(by_part.most_common()),
        "alone_by_kind": dict(by_kind.most_common()),
    }


def print_concurrency(busy: dict) -> None:
    with_busy = ", ".join(f"{k}: {ms:.1f}" for k, ms in busy["ms_per_step_with_busy"].items())
    print(
        f"workers busy: {busy['mean_busy_workers']:.2f} of {busy['workers']} on average; "
        f"ms/step with 0, 1, ... busy: {with_busy}"
    )
    print(f"op time with its worker the only one busy: {busy['alone_ms_per_step']:.1f} ms/step")
    for table in ("alone_by_kind", "alone_by_part"):
        print("  " + table.replace("_", " ") + ":")
        for name, ms in busy[table].items():
            print(f"    {name:>16}: {ms:7.1f} ms")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile-steps", type=int, default=5, help="steps under the profiler")
    own, rest = parser.parse_known_args(argv)
    args = throughput.parse_args(rest)
    args.steps = own.profile_steps
    result = profile(args)
    op_ms = result["op_ms_per_step"]
    print(f"wall {result['wall_ms_per_step']:.1f} ms/step under the profiler; ops {op_ms:.1f} ms")
    for table in ("by_part", "by_kind"):
        print(table.replace("_", " ") + ":")
        for name, ms in result[table].items():
            print(f"  {name:>16}: {ms:7.1f} ms  {100 * ms / op_ms:5.1f} %")
    print_concurrency(result["concurrency"])
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    host_memory.configure_for_run()  # as `python -m byol_jax.train` does, before JAX starts
    main()
