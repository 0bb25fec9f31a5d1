"""The training program end to end: configs, tfds mock data, resume after SIGKILL, a
two-process cluster, and the errors a bad config gets before anything compiles."""

import json
import pathlib
import signal
import socket
import subprocess
import sys
import time

import helpers
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from byol_jax import checkpoint, lifecycle
from byol_jax.programs import pretraining

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = helpers.TINY_FLAGS


_load = helpers.load_config  # configs/<name>.py, tiny, with (dotted key, value) overrides
_env = helpers.subprocess_env


def _train_command(workdir, *args):
    return [
        sys.executable,
        "-m",
        "byol_jax.train",
        "--config",
        str(REPO / "configs" / "quickstart.py"),
        "--workdir",
        str(workdir),
        *TINY,
        *args,
    ]


def _final_params(workdir):
    steps = sorted(
        int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit()
    )
    path = pathlib.Path(workdir) / "checkpoints" / str(steps[-1])
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as c:
        restored = c.restore(path / "default")
    return steps[-1], restored["online_params"], restored["target_params"]


@pytest.mark.slow
def test_quickstart_runs_end_to_end_and_prints_both_knn_figures(tmp_path):
    result = subprocess.run(
        _train_command(
            tmp_path,
            "--config.total_steps=6",
            "--config.batch_size=32",
            "--config.log_every=3",
            "--config.checkpoint_every=3",
            "--config.knn_every=3",
        ),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # A CPU run (JAX_PLATFORMS=cpu): the entry point kept freed host memory before JAX started.
    assert "host memory: freed memory kept for reuse" in result.stderr
    assert "kNN top-1 of the learned representation:" in result.stdout
    assert "kNN top-1 of a randomly initialised encoder:" in result.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 6
    # The reported figure is the saved state's kNN, recomputed here outside the program (to
    # one query: near-ties may break the other way in float64).
    expected, queries = helpers.independent_knn(tmp_path, _load("quickstart"))
    assert abs(summary["knn_top1"] - expected) <= 1 / queries + 1e-9
    assert summary["knn_random_init_top1"] > 0.3  # 10 classes: random features beat chance
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [3, 6]
    assert [r["step"] for r in rows if "knn_top1" in r] == [3, 6]  # the monitor, then the end
    assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in rows if "loss" in r)
    assert list((tmp_path / "tensorboard").iterdir()), "no TensorBoard event file"
    assert json.loads((tmp_path / "config.json").read_text())["encoder"] == "tiny"
    from PIL import Image

    with Image.open(tmp_path / "training_curves.png") as curves:  # promised at the end of a run
        curves.verify()
        assert curves.size[0] > 300


@pytest.mark.slow
def test_sigkill_then_resume_ends_bit_identical(tmp_path):
    args = (
        "--config.total_steps=40",
        "--config.batch_size=16",
        "--config.log_every=2",
        "--config.checkpoint_every=2",
        "--config.knn_at_end=False",
    )
    straight = subprocess.run(
        _train_command(tmp_path / "straight", *args),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert straight.returncode == 0, straight.stderr[-3000:]

    workdir = tmp_path / "killed"
    process = subprocess.Popen(
        _train_command(workdir, *args),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = workdir / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (
        checkpoints.exists() and any(p.name == "6" for p in checkpoints.iterdir())
    ):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert killed_at < 40, "the run finished before it could be killed"
    resumed = subprocess.run(
        _train_command(workdir, *args), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from the checkpoint of step {killed_at}" in resumed.stderr

    step_a, online_a, target_a = _final_params(tmp_path / "straight")
    step_b, online_b, target_b = _final_params(workdir)
    assert step_a == step_b == 40
    for a, b in zip(
        jax.tree.leaves((online_a, target_a)), jax.tree.leaves((online_b, target_b)), strict=True
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_sigterm_saves_and_exits_with_the_preemption_status(tmp_path):
    args = (
        "--config.total_steps=100000",
        "--config.batch_size=16",
        "--config.log_every=1",
        "--config.checkpoint_every=100000",
        "--config.knn_at_end=False",
    )
    process = subprocess.Popen(
        _train_command(tmp_path, *args),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (
        metrics.exists() and metrics.read_text().count("\n") >= 2
    ):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == lifecycle.PREEMPTED_EXIT_CODE, stderr[-3000:]
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 2 <= saved[0] < 100000
    assert f"saved the checkpoint of step {saved[0]}" in stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_cluster_equals_one_process(tmp_path):
    args = (
        "--config.total_steps=4",
        "--config.batch_size=16",
        "--config.log_every=2",
        "--config.checkpoint_every=4",
        "--config.knn_at_end=False",
    )
    single = subprocess.run(
        _train_command(tmp_path / "single", *args),
        env=_env(8),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    port = _free_port()
    cluster = [
        subprocess.Popen(
            _train_command(
                tmp_path / "cluster",
                *args,
                "--config.distributed=True",
                f"--config.coordinator_address=127.0.0.1:{port}",
                "--config.num_processes=2",
                f"--config.process_id={i}",
            ),
            env=_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in cluster]
    for p, (_, err) in zip(cluster, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    step_a, online_a, target_a = _final_params(tmp_path / "single")
    step_b, online_b, target_b = _final_params(tmp_path / "cluster")
    assert step_a == step_b == 4
    for a, b in zip(
        jax.tree.leaves((online_a, target_a)), jax.tree.leaves((online_b, target_b)), strict=True
    ):
        # Across processes the all-reduces sum in another order; four LARS steps amplified that
        # to 4.8e-5 on an avx512_fp16 CPU (within 1e-6 on the earlier sessions' CPU).
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-4)


@pytest.mark.parametrize(
    "name, split_key", [("cifar10", "train"), ("stl10", "train+unlabelled"), ("imagenet", "train")]
)
def test_tfds_configs_train_on_mock_data_over_8_devices(tmp_path, name, split_key):
    overrides = [
        ("total_steps", 2),
        ("batch_size", 16),
        ("image_size", 32),
        ("log_every", 1),
        ("checkpoint_every", 2),
        ("knn_at_end", True),
        ("knn_k", 5),
        ("eval_batch_size", 16),
        ("data.data_dir", str(tmp_path / "tfds")),
    ]
    if name == "imagenet":
        overrides += [("knn_at_end", False)]
        manual = tmp_path / "tfds" / "downloads" / "manual"  # the manual-download check passes
        manual.mkdir(parents=True)
        (manual / "ILSVRC2012_img_train.tar").touch()
    config = _load(name, *overrides)
    assert config.data.train_split == split_key
    with tfds.testing.mock_data(num_examples=48):
        summary = pretraining.train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["steps"] == 2
    if name != "imagenet":
        with tfds.testing.mock_data(num_examples=48):
            expected, queries = helpers.independent_knn(tmp_path / "run", config)
        assert abs(summary["knn_top1"] - expected) <= 1 / queries + 1e-9
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and all(
        np.isfinite(r["loss"]) for r in rows if "loss" in r
    )


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ([("batch_size", 12)], ValueError, "not divisible by the 8 devices"),
        ([("batch_size", 0)], ValueError, "batch_size must be positive"),
        ([("base_tau", 1.5)], ValueError, r"base_tau must be in \[0, 1\]"),
        (
            [("data.source", "folder"), ("data.folder", "/nonexistent/images")],
            ValueError,
            "/nonexistent/images",
        ),
        ([("optimizer", "rmsprop")], ValueError, "Unknown optimizer"),
        ([("encoder", "resnet7")], ValueError, "ResNet depth 7 is not one of"),
        ([("dtype", "float16")], ValueError, "dtype must be 'auto', 'float32' or 'bfloat16'"),
        # Settings that would be ignored are refused, with the fix.
        (
            [("data.host_crop", True)],  # quickstart's views set their own crop_area
            ValueError,
            r"augment.view1.crop_area is set, but data.host_crop=True.*--config.data.crop_area",
        ),
        (
            [("optimizer", "adam"), ("weight_decay", 0.0), ("momentum", 0.9)],
            ValueError,
            r"optimizer='adam' does not use momentum=0.9",
        ),
        ([("optimizer", "adam")], ValueError, r"does not use weight_decay=1e-06 \(use 'adamw'"),
        ([("optimizer", "adamw"), ("trust_coefficient", 1e-3)], ValueError, "trust_coefficient"),
        (
            [("warmup_fraction", None), ("total_steps", 20), ("batch_size", 128)],
            ValueError,
            r"warm-up of 2 epochs is 22 steps \(11 steps per epoch\), but the run has only "
            r"20 steps.*warmup_epochs=1.72 or less.*warmup_fraction=0.1",
        ),
        ([("warmup_fraction", 1.0)], ValueError, r"warmup_fraction must be in \[0, 1\)"),
    ],
)
def test_bad_config_is_a_clear_error_before_compilation(tmp_path, overrides, error, message):
    config = _load("quickstart", *overrides)
    with pytest.raises(error, match=message):
        pretraining.setup(config, str(tmp_path))


@pytest.mark.parametrize(
    "overrides, warmup",
    [
        ([("warmup_fraction", None), ("total_steps", 100)], 22),  # 2 epochs of 11 steps
        ([("warmup_fraction", 0.25), ("total_steps", 100)], 25),
    ],
)
def test_the_learning_rate_schedule_the_run_uses(tmp_path, overrides, warmup):
    config = _load("quickstart", ("batch_size", 128), *overrides)
    run = pretraining.setup(config, str(tmp_path))
    peak = config.base_learning_rate * 128 / 256
    params = {"w": np.ones((2, 2), np.float32)}
    state, rates = run.tx.init(params), []
    for _ in range(run.total_steps):
        _, state = run.tx.update({"w": np.zeros((2, 2), np.float32)}, state, params)
        rates.append(float(state.hyperparams["learning_rate"]))
    assert rates[warmup - 1] == pytest.approx(peak * (warmup - 1) / warmup)  # still warming up
    assert rates[warmup] == pytest.approx(peak)  # the peak, right after the warm-up
    last = peak * 0.5 * (1 + np.cos(np.pi * (99 - warmup) / (100 - warmup)))
    assert rates[-1] == pytest.approx(last, rel=1e-4) and 0 < rates[-1] < 1e-3 * peak


def test_the_online_probe_needs_labels_in_the_pretraining_split(tmp_path):
    """A folder whose train split has no class folders but whose test split has: the probe
    would see only -1 labels, so the run is refused, unless the probe is turned off."""
    rng = np.random.default_rng(0)
    from PIL import Image

    for path in ["train/a.png", "train/b.png", "test/cat/c.png", "test/dog/d.png"]:
        (tmp_path / "data" / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(tmp_path / "data" / path)
    overrides = [("data.source", "folder"), ("data.folder", str(tmp_path / "data")), ("batch_size", 8)]  # fmt: skip
    with pytest.raises(
        ValueError, match=r"online_probe=True.*'train', which has none.*online_probe=False"
    ):
        pretraining.setup(_load("quickstart", *overrides), str(tmp_path / "w"))
    run = pretraining.setup(
        _load("quickstart", *overrides, ("online_probe", False)), str(tmp_path / "w")
    )
    assert run.learner.num_classes is None


def test_unknown_field_and_unwritable_workdir(tmp_path):
    config = _load("quickstart")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="cannot create the workdir"):
        pretraining.setup(config, str(blocker / "workdir"))
    result = subprocess.run(
        _train_command(tmp_path / "w", "--config.bacth_size=8"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "bacth_size" in result.stderr


def test_nonfinite_loss_stops_with_the_step_and_last_checkpoint(tmp_path):
    common = [
        ("batch_size", 16),
        ("log_every", 1),
        ("checkpoint_every", 2),
        ("knn_at_end", False),
        ("optimizer", "sgd"),
        ("warmup_epochs", 0),
        ("lr_schedule", "constant"),
    ]
    pretraining.train_and_evaluate(_load("quickstart", ("total_steps", 4), *common), str(tmp_path))
    # Resume the same run with an absurd learning rate: the first update overflows.
    diverging = _load("quickstart", ("total_steps", 8), ("base_learning_rate", 1e38), *common)
    with pytest.raises(
        lifecycle.NonFiniteLossError, match=r"diverged at step 5:.*checkpoint: step 4 in"
    ):
        pretraining.train_and_evaluate(diverging, str(tmp_path))
    saved = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), read_only=True).all_steps()
    assert max(saved) == 4
    _, online, target = _final_params(tmp_path)  # the newest checkpoint holds finite numbers
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves((online, target)))


def test_throughput_excludes_paused_time():
    from byol_jax import monitor

    now = [10.0]
    throughput = monitor.Throughput(images_per_step=100, clock=lambda: now[0])
    now[0] += 0.3  # training
    with throughput.paused():
        now[0] += 5.0  # e.g. a kNN monitor between two logs
    now[0] += 0.2
    assert throughput(2) == pytest.approx(200 / 0.5)  # 200 images in 0.5 s of training
    now[0] += 0.25
    assert throughput(1) == pytest.approx(100 / 0.25)  # the next interval starts afresh
