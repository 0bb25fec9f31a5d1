"""Reliability through `python -m byol_jax.train`: SIGKILL at random moments and mid-write,
SIGTERM preemption (one process and a two-process cluster), damaged checkpoints, and
skipped non-finite steps. Every interrupted run must end bit-identical to the uninterrupted
one (``straight``) and leave only restorable checkpoints."""

import importlib.util
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from byol_jax import lifecycle, monitor
from byol_jax.programs import pretraining

REPO = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("fault_injection", REPO / "tools/fault_injection.py")
fi = sys.modules["fault_injection"] = importlib.util.module_from_spec(
    _spec
)  # dataclasses look it up
_spec.loader.exec_module(fi)

STEPS, EVERY = 16, 2  # the runs below: 16 steps, a checkpoint every 2 (3 kept)


@pytest.fixture(scope="module")
def pinned(tmp_path_factory):
    """A copy of configs/quickstart.py that every run of this module reads (edits to configs/
    while the module runs cannot make two runs differ)."""
    path = tmp_path_factory.mktemp("config") / "quickstart.py"
    shutil.copy(REPO / "configs" / "quickstart.py", path)
    return path


@pytest.fixture(scope="module")
def straight(tmp_path_factory, pinned):
    """The uninterrupted run's workdir and the restore template of its state."""
    root = tmp_path_factory.mktemp("straight")
    fi.reference_run(root / "run", STEPS, EVERY, fi.train_env(), pinned)
    template = fi.template_state(fi.load_config(STEPS, EVERY, pinned), root / "scratch")
    return root / "run", template


def _final_state(workdir, template):
    states = fi.restore_all(workdir, template)
    return max(states), states[max(states)]


def _assert_ends_like(workdir, straight):
    reference, template = straight
    step_a, state_a = _final_state(reference, template)
    step_b, state_b = _final_state(workdir, template)
    assert step_a == step_b == STEPS
    assert fi.bit_identical(state_a, state_b) == []


def _run(workdir, config_file, timeout=300):
    command = fi.train_command(workdir, STEPS, EVERY, config_file=config_file)
    return subprocess.run(
        command, env=fi.train_env(), capture_output=True, text=True, timeout=timeout
    )


def _wait_for_metric_lines(process, workdir, lines, timeout=240):
    metrics = pathlib.Path(workdir) / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= lines:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {lines} metric lines in {workdir} (exit {process.poll()})")


# ------------------------------------------------------------------------------ SIGKILL


@pytest.mark.slow
def test_sigkill_mid_checkpoint_write_and_mid_training_is_survived(tmp_path, straight, pinned):
    report = fi.inject_faults(
        tmp_path,
        kills=2,
        total_steps=STEPS,
        checkpoint_every=EVERY,
        moments=("checkpoint", "training"),
        straight=straight[0],
        config_file=pinned,
        training_window=0.3,  # well before the 16 steps end
        verbose=False,
    )
    assert report.kills == 2 and report.survived == 2, report.lives
    assert report.lives[-1].returncode == 0
    assert report.final_step == STEPS and report.differing_leaves == [], report.summary()
    # Every start after a kill resumed from the newest checkpoint the kill left, if any.
    for before, after in zip(report.lives, report.lives[1:], strict=False):
        if before.steps_on_disk and after.resumed_from is not None:
            assert after.resumed_from == before.steps_on_disk[-1]


# ------------------------------------------------------------------------------ SIGTERM


@pytest.mark.slow
def test_sigterm_then_restart_ends_bit_identical(tmp_path, straight, pinned):
    workdir = tmp_path / "preempted"
    process = subprocess.Popen(
        fi.train_command(workdir, STEPS, EVERY, config_file=pinned),
        env=fi.train_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_metric_lines(process, workdir, 3)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == lifecycle.PREEMPTED_EXIT_CODE, stderr[-3000:]
    saved = int(re.search(r"saved the checkpoint of step (\d+)", stderr).group(1))
    assert 3 <= saved < STEPS
    assert max(fi.restore_all(workdir, straight[1])) == saved  # off the every-2 schedule too

    resumed = _run(workdir, pinned)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from the checkpoint of step {saved}" in resumed.stderr
    _assert_ends_like(workdir, straight)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_to_one_process_of_a_cluster_saves_one_consistent_checkpoint(
    tmp_path, straight, pinned
):
    port, workdir = _free_port(), tmp_path / "cluster"
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]
    files = [open(log, "w") for log in logs]  # noqa: SIM115 (files: a full pipe would block)
    cluster = [
        subprocess.Popen(
            fi.train_command(
                workdir,
                100_000,
                100_000,
                "--config.distributed=True",
                f"--config.coordinator_address=127.0.0.1:{port}",
                "--config.num_processes=2",
                f"--config.process_id={i}",
                config_file=pinned,
            ),
            env=fi.train_env(4),
            stdout=subprocess.DEVNULL,
            stderr=file,
        )
        for i, file in enumerate(files)
    ]
    try:
        _wait_for_metric_lines(cluster[0], workdir, 2)
        cluster[1].send_signal(signal.SIGTERM)  # the non-primary process only
        for p in cluster:
            p.wait(timeout=120)
    finally:
        for p in cluster:
            if p.poll() is None:
                p.kill()
            p.wait()
        for file in files:
            file.close()
    errors = [log.read_text() for log in logs]
    codes = [p.returncode for p in cluster]
    assert codes == [lifecycle.PREEMPTED_EXIT_CODE] * 2, [e[-2000:] for e in errors]
    steps = [int(re.search(r"saved the checkpoint of step (\d+)", e).group(1)) for e in errors]
    assert steps[0] == steps[1] >= 2
    assert sorted(fi.restore_all(workdir, straight[1])) == [steps[0]]


# ------------------------------------------------------------------------------ damage


def _data_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    """The array data files of a checkpoint (ocdbt), largest first."""
    files = [p for p in (step_dir / "default").rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def _truncate(path: pathlib.Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _scramble(path: pathlib.Path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(255 - b for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_named_and_the_previous_one_resumes(
    tmp_path, straight, pinned
):
    workdir = tmp_path / "run"
    shutil.copytree(straight[0], workdir)
    newest = workdir / "checkpoints" / str(STEPS)
    _truncate(_data_files(newest)[0])
    result = _run(workdir, pinned)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(rf"checkpoint step {STEPS} in \S+ is damaged", result.stderr)
    assert f"Resuming from the checkpoint of step {STEPS - EVERY}" in result.stderr
    assert (workdir / "checkpoints" / f"{STEPS}.damaged").is_dir()  # kept for inspection
    _assert_ends_like(workdir, straight)  # step 16 trained again, bit for bit


def _files_and_times(root: pathlib.Path) -> dict:
    """{path: mtime} of the files under root (the run's metrics and logs aside)."""
    return {
        p: p.stat().st_mtime_ns
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(("metrics", "events"))
    }


@pytest.mark.slow
def test_no_good_checkpoint_refuses_to_train_over_them(tmp_path, straight, pinned):
    workdir = tmp_path / "run"
    shutil.copytree(straight[0], workdir)
    kept = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(kept) == 3
    for step, damage in zip(kept, (_truncate, _scramble, _truncate), strict=True):
        damage(_data_files(workdir / "checkpoints" / str(step))[0])
    before = _files_and_times(workdir)
    result = _run(workdir, pinned)
    assert result.returncode != 0
    assert "Refusing to start training over them" in result.stderr, result.stderr[-3000:]
    for step in kept:
        assert f"step {step}:" in result.stderr
    assert _files_and_times(workdir) == before  # nothing renamed, rewritten or added


# ------------------------------------------------------------------------------ numbers


def _config(total_steps, **overrides):
    config = fi.load_config(total_steps, 2)
    config.update(
        dict(optimizer="sgd", warmup_epochs=0, lr_schedule="constant", skip_nonfinite_steps=True)
    )
    config.update(overrides)
    return config


def test_skip_nonfinite_steps_skips_counts_and_finishes(tmp_path):
    pretraining.train_and_evaluate(_config(4), str(tmp_path))
    # Resumed with an absurd learning rate, every update overflows: all 4 steps are skipped.
    summary = pretraining.train_and_evaluate(_config(8, base_learning_rate=1e38), str(tmp_path))
    assert summary["steps"] == 8
    rows = [r for r in monitor.read_metrics(str(tmp_path)) if "skipped" in r]
    assert [(r["step"], r["skipped"]) for r in rows] == [(s, float(s > 4)) for s in range(1, 9)]
    template = fi.template_state(_config(8), tmp_path / "scratch")
    states = fi.restore_all(tmp_path, template)
    assert max(states) == 8 and int(states[8].step) == 8
    for name in ("online_params", "target_params"):
        a, b = getattr(states[4], name), getattr(states[8], name)
        assert all(
            np.array_equal(x, y)
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        )
