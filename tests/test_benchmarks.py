"""The benchmark scripts run (tiny settings): they must not rot. Their figures are not tested."""

import argparse
import os
import pathlib
import platform
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import batchnorm_step  # noqa: E402
import gpu_run  # noqa: E402
import host_memory as host_memory_benchmark  # noqa: E402
import nnx_step  # noqa: E402
import pytest  # noqa: E402
import quality  # noqa: E402
import step_profile  # noqa: E402
import throughput  # noqa: E402
import trainer_overhead  # noqa: E402

from byol_jax import monitor, parallel  # noqa: E402
from byol_jax.programs import pretraining  # noqa: E402


def test_throughput_reports_speed_compile_time_memory_and_flops():
    result = throughput.main(
        [
            "--encoder",
            "tiny",
            "--image-size",
            "16",
            "--batch",
            "8",
            "--steps",
            "2",
            "--devices",
            "2",
            "--conv-chunk",
            "2",
        ]
    )
    assert result["images_per_s"] > 0 and result["compile_s"] > 0 and result["peak_memory_gb"] > 0
    assert result["flops_per_image"] > 0 and result["devices"] == 2 and result["conv_chunk"] == 2
    assert [throughput._conv_chunk(t) for t in ("auto", "none", "8")] == ["auto", None, 8]


def test_quality_overrides_reach_the_config(tmp_path):
    overrides = [
        quality.parse_override(text)
        for text in (
            "views_in_one_batch=True",
            "augment.view1.crop_area=(0.2, 1.0)",
            "dtype=bfloat16",
        )
    ]
    assert overrides[2] == ("dtype", "bfloat16")  # a plain word stays a string
    args = argparse.Namespace(
        set=overrides, small_budget_views=False, encoder="resnet18", num_filters=16, batch=256, steps=800,
        warmup_epochs=0.5, lr=2e-3, optimizer="adam", tau_schedule="constant", base_tau=0.99,
        weight_decay=None,
    )  # fmt: skip
    config = quality.config_for(args, tmp_path)
    assert config.views_in_one_batch is True and config.dtype == "bfloat16"
    assert tuple(config.augment.view1.crop_area) == (0.2, 1.0)
    assert config.augment.view2.crop_area is None  # the recipe's own value
    assert (config.optimizer, config.total_steps, config.data.folder) == (
        "adam",
        800,
        str(tmp_path),
    )
    args.small_budget_views = True
    args.set = [("augment.view2.crop_area", (0.5, 1.0)), ("batch_size", 64)]
    config = quality.config_for(args, tmp_path)  # --set wins over the benchmark's own values
    assert config.views_in_one_batch is True and tuple(config.augment.view1.crop_area) == (0.2, 1)
    assert tuple(config.augment.view2.crop_area) == (0.5, 1.0) and config.batch_size == 64
    with pytest.raises(argparse.ArgumentTypeError, match="key=value"):
        quality.parse_override("views_in_one_batch")


def test_gpu_script_runs_at_tiny_size_on_the_cpu(tmp_path):
    results = gpu_run.main(["--tiny", "--out", str(tmp_path)])
    assert [r["name"] for r in results] == ["resnet50-224-bf16", "resnet18-32-f32"]
    assert all(r["images_per_s"] > 0 for r in results)
    assert "| setting |" in (tmp_path / "results.md").read_text()


def test_nnx_step_benchmark_runs_all_three_variants():
    result = nnx_step.main(["--batch", "8", "--image-size", "8", "--width", "4", "--steps", "1", "--rounds", "1"])  # fmt: skip
    assert set(result["median_s"]) == {"linen", "nnx", "nnx_bridge_tolinen"}
    assert all(seconds > 0 for seconds in result["median_s"].values())


def test_step_profile_attributes_the_steps_op_time_to_its_parts():
    result = step_profile.main(
        ["--encoder", "tiny", "--image-size", "16", "--batch", "8", "--profile-steps", "2"]
    )
    parts = result["by_part"]
    # Every part of the step ran ops that the profiler saw and the HLO named.
    for part in ("views", "online forward", "online backward", "target", "update", "ema"):
        assert parts.get(part, 0) > 0, (part, parts)
    assert result["by_kind"]["convolution"] > 0 and result["by_kind"]["BatchNorm"] > 0
    total = sum(parts.values())
    assert abs(total - result["op_ms_per_step"]) < 1e-6 * max(total, 1)
    # Almost every thunk the trace shows is an instruction of the compiled step.
    assert result["unattributed_ms_per_step"] < 0.05 * total
    # The workers' busy time was read from the trace: the histogram covers the profiled
    # steps, and an op can run alone only for as long as ops ran at all.
    busy = result["concurrency"]
    assert busy["workers"] >= 1 and max(busy["ms_per_step_with_busy"]) <= busy["workers"]
    assert 0 < busy["mean_busy_workers"] <= busy["workers"]
    assert sum(busy["ms_per_step_with_busy"].values()) <= result["wall_ms_per_step"] * 1.01
    assert 0 <= busy["alone_ms_per_step"] <= total


def test_step_profile_concurrency_counts_busy_workers_and_lone_ops():
    def marker(tid, ts, what):
        return {"ph": "X", "tid": tid, "ts": ts, "dur": 0.0, "name": f"ThreadpoolListener::{what}"}

    def op(tid, ts, dur, name, module="jit_train_step"):
        args = {"hlo_module": module, "hlo_op": name}
        return {"ph": "X", "tid": tid, "ts": ts, "dur": dur, "name": name, "args": args}

    names = [
        {"ph": "M", "name": "thread_name", "tid": 1, "args": {"name": "tf_XLAEigen/1"}},
        {"ph": "M", "name": "thread_name", "tid": 2, "args": {"name": "tf_XLAEigen/2"}},
        {"ph": "M", "name": "thread_name", "tid": 3, "args": {"name": "python"}},
    ]
    # Worker 1 busy 0-1000 us, worker 2 busy 200-600 us; the python thread's markers and a
    # span before the first op do not count.
    events = names + [
        marker(1, 0, "StartRegion"), marker(1, 1000, "StopRegion"),
        marker(2, 200, "StartRegion"), marker(2, 600, "StopRegion"),
        marker(2, -500, "StartRegion"), marker(2, -100, "StopRegion"),
        marker(3, 0, "StartRegion"), marker(3, 1000, "StopRegion"),
        op(1, 0, 500, "conv.1"), op(1, 500, 500, "fusion.2"), op(2, 200, 400, "conv.3"),
        op(2, 300, 9000, "other_module_op", module="jit_other"),
    ]  # fmt: skip
    busy = step_profile.concurrency(events, step_profile.module_ops(events, "jit_train_step"))
    assert busy["workers"] == 2
    # 0-200 and 600-1000 us one worker busy, 200-600 two: from the first op to the last.
    assert busy["ms_with_busy"] == {1: pytest.approx(0.6), 2: pytest.approx(0.4)}
    assert busy["mean_busy"] == pytest.approx(1.4)
    # conv.1 ran alone 0-200 us, fusion.2 600-1000 us; conv.3 never ran alone.
    assert busy["alone_us"] == {
        "conv.1": pytest.approx(200), "fusion.2": pytest.approx(400), "conv.3": 0.0
    }  # fmt: skip


def test_step_profile_reads_parts_and_kinds_from_hlo_metadata():
    hlo = """HloModule jit_train_step

%fused_computation.1 (p0: f32[4,8]) -> f32[4,8] {
  %p0 = f32[4,8]{1,0} parameter(0)
  ROOT %max.1 = f32[4,8]{1,0} maximum(%p0, %p0), metadata={op_name="jit(train_step)/jvp(online)/ResNet/stem_bn/sub"}
}

ENTRY %main (a: f32[4,8]) -> f32[4,8] {
  %a = f32[4,8]{1,0} parameter(0)
  %convolution.3 = f32[4,8]{1,0} convolution(%a, %a), metadata={op_name="jit(train_step)/transpose(jvp(online))/ResNet/Conv_0/conv_general_dilated"}
  %add_fusion = f32[4,8]{1,0} fusion(%convolution.3), kind=kLoop, calls=%fused_computation.1
  %tuple.4 = (f32[4,8]{1,0}, /*index=1*/f32[4,8]{1,0}) tuple(%a, %a), metadata={op_name="jit(train_step)/ema/tuple"}
  ROOT %dot.2 = f32[4,8]{1,0} dot(%add_fusion, %a), metadata={op_name="jit(train_step)/jvp(target)/MLP/Dense_0/dot_general"}
}
"""
    instructions = step_profile.parse_hlo(hlo)
    parts = {n: step_profile.part_of(i["op_name"]) for n, i in instructions.items() if n != "a"}
    kinds = {n: step_profile.kind_of(i) for n, i in instructions.items() if n != "a"}
    assert parts["convolution.3"] == "online backward" and kinds["convolution.3"] == "convolution"
    assert parts["add_fusion"] == "online forward" and kinds["add_fusion"] == "BatchNorm"
    assert parts["dot.2"] == "target" and kinds["dot.2"] == "matrix multiply"
    assert parts["tuple.4"] == "ema"  # a /*index=N*/ comment in its shape (while loops have)


def test_trainer_overhead_times_the_trainer_and_its_bare_step(tmp_path):
    folder = trainer_overhead.make_jpeg_folder(tmp_path, 40)
    originals = (pretraining.datasets.pretrain_batches, parallel.Replicas.shard, monitor.MetricWriter.write)  # fmt: skip
    result = trainer_overhead.main(
        ["--source", "folder", "--folder", folder, "--num-filters", "4", "--batch", "8",
         "--log-every", "2", "--intervals", "2", "--rounds", "1"]
    )  # fmt: skip
    (only,) = result["rounds"]
    trainer, bare = only["trainer"], only["bare_step"]
    assert trainer["images_per_s"] > 0 and bare["images_per_s"] > 0
    assert only["ratio"] == pytest.approx(trainer["images_per_s"] / bare["images_per_s"])
    # The folder source decodes JPEGs on the loop's thread's behalf: its wait was seen.
    assert trainer["pipeline_ms_per_step"] > 0 and trainer["transfer_ms_per_step"] > 0
    assert 0 < trainer["cpu_s_per_wall_s"] <= len(os.sched_getaffinity(0)) + 0.5  # cores
    # The wrapped library calls are the library's own again.
    assert originals == (pretraining.datasets.pretrain_batches, parallel.Replicas.shard, monitor.MetricWriter.write)  # fmt: skip


def test_batchnorm_step_times_both_sides():
    result = batchnorm_step.main(["--shape", "4", "3", "3", "2", "--steps", "1", "--rounds", "1"])
    assert result["byol_jax_ms"] > 0 and result["flax_ms"] > 0
    assert result["ratio"] == pytest.approx(result["flax_ms"] / result["byol_jax_ms"])


def test_host_memory_benchmark_times_the_step_both_ways():
    tiny = ["--encoder", "tiny", "--image-size", "16", "--batch", "8", "--steps", "2"]
    result = host_memory_benchmark.main([*tiny, "--warmup", "0", "--rounds", "1"])
    (default,), (kept,) = result["runs"]["0"], result["runs"]["1"]
    assert not default["kept"] and kept["kept"] == (platform.libc_ver()[0] == "glibc")
    for run in (default, kept):
        assert run["wall_ms"] > 0 and run["temp_mb"] > 0 and run["page_faults"] >= 0
    assert result["speedup"] == pytest.approx(default["wall_ms"] / kept["wall_ms"])
