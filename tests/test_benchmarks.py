"""The benchmark scripts run (tiny settings): they must not rot. Their figures are not tested."""

import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_run  # noqa: E402
import throughput  # noqa: E402


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
        ]
    )
    assert result["images_per_s"] > 0 and result["compile_s"] > 0 and result["peak_memory_gb"] > 0
    assert result["flops_per_image"] > 0 and result["devices"] == 2


def test_gpu_script_runs_at_tiny_size_on_the_cpu(tmp_path):
    results = gpu_run.main(["--tiny", "--out", str(tmp_path)])
    assert [r["name"] for r in results] == ["resnet50-224-bf16", "resnet18-32-f32"]
    assert all(r["images_per_s"] > 0 for r in results)
    assert "| setting |" in (tmp_path / "results.md").read_text()
