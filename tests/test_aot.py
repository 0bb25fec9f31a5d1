"""Ahead-of-time compilation for a TPU topology on this CPU (libtpu, no TPU): the trainer's
own step for a tiny config compiles for v5e:2x2, its FLOPs per image match the same step
compiled for this CPU, memory grows with the batch, and what cannot work is refused before
compiling."""

import dataclasses
import json
import subprocess
import sys

import helpers
import jax
import pytest

from byol_jax.programs import ahead_of_time as aot

try:
    aot.topology_devices("v5e:2x2")
    HAVE_LIBTPU = True
except aot.TopologyError as error:
    HAVE_LIBTPU, WHY = False, str(error)

needs_libtpu = pytest.mark.skipif(
    not HAVE_LIBTPU,
    reason="libtpu is not installed, so XLA cannot compile for TPU here: "
    'pip install -e ".[test,tpu]" (what .ci/run installs)',
)


def _config(batch=32, image_size=32):
    """The quickstart config at tiny size, in float32 so that TPU and CPU count alike."""
    return helpers.load_config(
        "quickstart", ("batch_size", batch), ("image_size", image_size), ("dtype", "float32"),
        ("total_steps", 100),
    )  # fmt: skip


@pytest.fixture(scope="module")
def reports():
    """(TPU report at batch 32, TPU report at batch 128, the CPU report at batch 32), 32 px:
    8 and 32 images per device. (With 4 per device XLA:TPU's cost model counts convolutions
    ~1.6x higher than XLA:CPU's, as if the batch were padded to 8; from 8 up they agree. At
    16 px the temporaries do not grow with the batch: fixed buffers dominate them.)"""
    tpu32, _ = aot.compile_for_topology(_config(32), "v5e:2x2", num_classes=10)
    tpu128, _ = aot.compile_for_topology(_config(128), "v5e:2x2", num_classes=10)
    cpu32, _ = aot.compile_for_devices(_config(32), jax.devices()[:4], 10, "cpu", "cpu")
    return tpu32, tpu128, cpu32


@needs_libtpu
def test_flops_per_image_match_the_cpu_compiled_step(reports):
    tpu, _, cpu = reports
    assert tpu.device_kind == "TPU v5 lite" and tpu.devices == 4 and tpu.batch_per_device == 8
    # XLA's count of the same program on two backends: measured 1.8 % apart (fusions differ).
    assert tpu.flops_per_image == pytest.approx(cpu.flops_per_image, rel=0.05)
    assert tpu.flops_per_image > 1e7


@needs_libtpu
def test_memory_is_positive_and_a_larger_batch_needs_more_temporaries(reports):
    tpu32, tpu128, _ = reports
    for report in (tpu32, tpu128):
        assert report.argument_bytes > 0 and report.output_bytes > 0 and report.temp_bytes > 0
        assert report.fits and report.memory_bytes == 16 * 2**30
    # Measured: 14.4 -> 28.8 MB (37.5 MB at batch 128 before BatchNorm's hand-written gradient,
    # which keeps fewer intermediates for the backward pass).
    assert tpu128.temp_bytes > 1.5 * tpu32.temp_bytes
    # The state dominates the arguments; the batch adds its uint8 images, which the TPU lays
    # out in 32-bit words (measured: exactly 4 bytes per pixel value).
    extra_images = (128 - 32) // 4 * 32 * 32 * 3
    assert tpu128.argument_bytes - tpu32.argument_bytes == 4 * extra_images
    assert tpu128.flops_per_image == pytest.approx(tpu32.flops_per_image, rel=0.05)


@needs_libtpu
def test_a_step_that_does_not_fit_is_said_so_with_a_batch_that_would(reports):
    tpu = reports[0]
    room = tpu.argument_bytes + tpu.output_bytes + tpu.temp_bytes // 2  # half the temporaries
    tiny_hbm = dataclasses.replace(tpu, memory_bytes=room)
    assert tiny_hbm.fits is False and tiny_hbm.batch_that_fits() == 4
    text = aot.describe(tiny_hbm, 0.35)
    assert "DOES NOT FIT" in text and "about 4 images per device would" in text


@needs_libtpu
def test_the_command_reports_the_layout_of_a_multi_host_pod(tmp_path):
    """v5e:4x8 is 32 chips on 8 hosts: the per-process batch is the input pipeline's."""
    out = tmp_path / "report.json"
    command = [
        sys.executable, "-m", "byol_jax.aot", "--config", str(helpers.REPO / "configs" / "quickstart.py"),
        "--topology", "v5e:4x8", "--json", str(out), *helpers.TINY_FLAGS,
        "--config.batch_size=64", "--config.total_steps=100",
    ]  # fmt: skip
    result = subprocess.run(command, env=helpers.subprocess_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "v5e:4x8: 32 devices (TPU v5 lite), 8 processes x 4 devices" in result.stdout
    report = json.loads(out.read_text())
    assert report["batch_per_device"] == 2 and report["batch_per_process"] == 8
    assert report["images_per_s_estimate"] > 0 and report["fits"] is True


@needs_libtpu
def test_what_cannot_work_is_refused_before_compiling():
    with pytest.raises(aot.TopologyError, match=r"batch_size=18 does not split over the 4 devices of v5e:2x2.*multiple of 4 \(e.g. 16\)"):  # fmt: skip
        aot.compile_for_topology(_config(18), "v5e:2x2", num_classes=10)
    with pytest.raises(aot.TopologyError, match=r"cannot describe the TPU topology 'v9x:2x2'.*v5e:16x16"):  # fmt: skip
        aot.compile_for_topology(_config(32), "v9x:2x2", num_classes=10)


def test_without_libtpu_the_message_says_how_to_install_it(monkeypatch):
    from jax.experimental import topologies

    def missing(**kwargs):
        raise RuntimeError("Unknown backend tpu: TPU not found")

    monkeypatch.setattr(topologies, "get_topology_desc", missing)
    with pytest.raises(aot.TopologyError, match=r'libtpu is not installed.*pip install -e ".\[tpu\]"'):  # fmt: skip
        aot.topology_devices("v5e:2x2")
