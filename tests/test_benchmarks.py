"""The benchmark scripts run (tiny settings): they must not rot. Their figures are not tested."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent


def _run(*args, devices=2):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    done = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_throughput_reports_speed_compile_time_memory_and_flops():
    out = _run(
        "benchmarks/throughput.py",
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
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["images_per_s"] > 0 and result["compile_s"] > 0 and result["peak_memory_gb"] > 0
    assert result["flops_per_image"] > 0 and result["devices"] == 2


def test_gpu_script_runs_at_tiny_size_on_the_cpu(tmp_path):
    _run("benchmarks/gpu_run.py", "--tiny", "--out", str(tmp_path), devices=1)
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in results] == ["resnet50-224-bf16", "resnet18-32-f32"]
    assert all(r["images_per_s"] > 0 for r in results)
    assert "| setting |" in (tmp_path / "results.md").read_text()
