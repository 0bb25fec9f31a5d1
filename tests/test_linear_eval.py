"""Linear evaluation: the classifier step against NumPy, the protocol on known features, the
program end to end on a tiny pre-trained run (CLI, exact resume after SIGTERM), and the errors
of bad input."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from byol_jax import classifier, default_config, features, lifecycle, parallel, pretrained
from byol_jax.programs import linear_evaluation as le
from byol_jax.programs import pretraining

REPO = pathlib.Path(__file__).resolve().parent.parent
_env, _load = helpers.subprocess_env, helpers.load_config


def _linear_config(name, pretrained_workdir, **overrides):
    """configs/linear_eval/<name>.py for ``pretrained_workdir``; overrides as a__b=value."""
    overrides = {"pretrained_workdir": str(pretrained_workdir), "progress_bar": False, **overrides}
    return default_config.from_file(
        REPO / "configs" / "linear_eval" / f"{name}.py",
        *((k.replace("__", "."), v) for k, v in overrides.items()),
    )


# ------------------------------------------------------------------------ classifier level


def _numpy_first_step(x, y, num_classes, lr):
    """SGD, Nesterov momentum 0.9, from zero weights: softmax is uniform, the momentum trace
    is the gradient g, and the Nesterov update is g + 0.9 g."""
    probs = np.full((len(x), num_classes), 1.0 / num_classes)
    delta = (probs - np.eye(num_classes)[y]) / len(x)
    grad_kernel, grad_bias = x.T @ delta, delta.sum(0)
    return -lr * 1.9 * grad_kernel, -lr * 1.9 * grad_bias


def test_classifier_step_matches_numpy_on_one_device_and_over_8():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype(np.float32)
    y = rng.integers(0, 4, size=32).astype(np.int32)
    tx = classifier.linear_optimizer(batch_size=32, total_steps=10, base_learning_rate=0.2)
    state = classifier.init_classifier(6, 4, tx)
    single, metrics = jax.jit(classifier.classifier_step)(state, x, y)
    kernel, bias = _numpy_first_step(x, y, 4, lr=0.2 * 32 / 256)
    np.testing.assert_allclose(single.params["kernel"], kernel, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(single.params["bias"], bias, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics["loss"], np.log(4), rtol=1e-6)

    replicas = parallel.Replicas("pmap", "batch")
    step = replicas.map(lambda s, f, k, lab: classifier.classifier_step(s, f, lab, "batch"))
    mapped, mapped_metrics = step(
        replicas.replicate(state), replicas.shard(x), jax.random.key(0), replicas.shard(y)
    )
    mapped = replicas.unreplicate(mapped)
    for a, b in zip(jax.tree.leaves(mapped.params), jax.tree.leaves(single.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert replicas.fetch(mapped_metrics)["loss"] == pytest.approx(float(metrics["loss"]))


def test_padding_rows_are_ignored_and_counts_are_top_k():
    params = {"kernel": jnp.eye(6, dtype=jnp.float32), "bias": jnp.zeros(6)}
    features = jnp.array([[6.0, 5, 4, 3, 2, 1]] * 3 + [[9.0] * 6])  # logits = features
    labels = jnp.array([0, 4, 5, -1])  # best; fifth best; last; padding
    counts = classifier.correct_counts(params, features, labels)
    assert {k: float(v) for k, v in counts.items()} == {"count": 3.0, "top1": 1.0, "top5": 2.0}
    scores = classifier.evaluate_linear(params, features[:3], labels[:3])
    assert scores == pytest.approx({"top1": 1 / 3, "top5": 2 / 3})


def test_protocol_separates_one_hot_features_and_random_features_stay_at_chance():
    rng = np.random.default_rng(1)
    num_classes = 10
    y_train, y_test = rng.integers(0, 10, 600), rng.integers(0, 10, 300)
    one_hot = lambda y: np.eye(num_classes)[y] + 0.1 * rng.normal(size=(len(y), num_classes))
    state = classifier.train_linear_classifier(
        one_hot(y_train), y_train, num_classes, batch_size=64, num_epochs=5
    )
    separable = classifier.evaluate_linear(state, one_hot(y_test), y_test)
    print(f"\nlinear eval of one-hot features (+ noise 0.1): {separable}")
    assert separable["top1"] == 1.0 and separable["top5"] == 1.0

    x_train, x_test = rng.normal(size=(400, 64)), rng.normal(size=(1000, 64))
    y_train, y_test = rng.integers(0, 10, 400), rng.integers(0, 10, 1000)
    state = classifier.train_linear_classifier(
        x_train, y_train, num_classes, batch_size=64, num_epochs=40
    )
    train_fit = classifier.evaluate_linear(state, x_train, y_train)
    chance = classifier.evaluate_linear(state, x_test, y_test)
    print(f"linear eval of random features: train {train_fit}, test {chance}")
    assert train_fit["top1"] > 0.3  # it does fit the training noise ...
    for k, p in ((1, 0.1), (5, 0.5)):  # ... and stays at chance on new data (4 sigma)
        assert abs(chance[f"top{k}"] - p) < 4 * np.sqrt(p * (1 - p) / 1000)


def test_split_sizes_follow_tfds_slicing():
    counts = {"train": 1_281_167, "validation": 50_000}
    assert le.split_size(counts, "train[10000:]") == 1_271_167
    assert le.split_size(counts, "train[:10000]") == 10_000
    assert le.split_size(counts, "train[:10%]") == 128_117
    assert le.split_size(counts, "validation") == 50_000
    with pytest.raises(ValueError, match="'test' is not in the data"):
        le.split_size(counts, "test")


def test_imagenet_config_is_the_papers_protocol():
    config = _linear_config("imagenet", "/unused")
    assert (config.batch_size, config.num_epochs, config.base_learning_rate) == (1024, 80, 0.2)
    assert (config.momentum, config.nesterov, config.weight_decay) == (0.9, True, 0.0)
    assert config.data.probe_split == "train[10000:]" and config.holdout_split == "train[:10000]"
    assert config.data.eval_split == "validation"
    schedule_tx = classifier.linear_optimizer(batch_size=1024, total_steps=99_280)
    params = {"w": jnp.zeros((2, 2))}
    _, state = schedule_tx.update(params, schedule_tx.init(params), params)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.8)  # 0.2 x 1024 / 256


# ---------------------------------------------------------------------------- the program


@pytest.fixture(scope="module")
def pretrained_workdir(tmp_path_factory):
    """A tiny quick-start pre-training run (tiny encoder with 8 filters, 4 steps)."""
    workdir = tmp_path_factory.mktemp("pretrained")
    config = _load(
        "quickstart",
        ("total_steps", 4),
        ("batch_size", 16),
        ("knn_at_end", False),
        ("log_every", 2),
        ("checkpoint_every", 4),
    )
    pretraining.train_and_evaluate(config, str(workdir))
    return workdir


def _final_classifier(workdir):
    directory = pathlib.Path(workdir) / "checkpoints"
    step = max(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    with ocp.StandardCheckpointer() as c:
        return step, c.restore(directory / str(step) / "default")["params"]


@pytest.mark.slow
def test_program_end_to_end_and_resume_after_sigterm_is_bit_identical(
    pretrained_workdir, tmp_path, monkeypatch
):
    settings = {"total_steps": 12, "batch_size": 32, "log_every": 3, "checkpoint_every": 100}
    command = [
        sys.executable,
        "-m",
        "byol_jax.linear_eval",
        "--config",
        str(REPO / "configs" / "linear_eval" / "quickstart.py"),
        f"--config.pretrained_workdir={pretrained_workdir}",
        "--config.progress_bar=False",
        "--workdir",
        str(tmp_path / "straight"),
        *(f"--config.{k}={v}" for k, v in settings.items()),
    ]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    print("\n" + result.stdout.strip())
    assert "top-1" in result.stdout and "top-5" in result.stdout
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert straight["steps"] == 12 and straight["pretrained_step"] == 4
    # The reported top-1 is the saved classifier's on the frozen features, recomputed here.
    _, params = _final_classifier(tmp_path / "straight")
    learner, state = pretrained.load(str(pretrained_workdir))
    linear = _linear_config("quickstart", pretrained_workdir)
    data = le.merged_data(pretrained.load_config(str(pretrained_workdir))[0], linear.data)
    test = features.embed_dataset(learner, state, data, data.eval_split)
    logits = test["representations"] @ params["kernel"] + params["bias"]
    expected = np.mean(np.argmax(logits, -1) == test["labels"])
    assert abs(straight["top1"] - expected) <= 1 / len(logits) + 1e-9
    assert straight["top1"] <= straight["top5"]
    rows = [
        json.loads(r) for r in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows if "loss" in r] == [3, 6, 9, 12]
    assert rows[-1]["test_top1"] == straight["top1"]

    # The same run, preempted by a real SIGTERM after step 5, then resumed.
    real_should_stop = lifecycle.should_stop

    def sigterm_after_step_5(flag, step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next line
        return real_should_stop(flag, step)

    config = _linear_config("quickstart", pretrained_workdir, **settings)
    workdir = str(tmp_path / "preempted")
    monkeypatch.setattr(lifecycle, "should_stop", sigterm_after_step_5)
    with pytest.raises(SystemExit) as exit_info:
        le.train_and_evaluate(config, workdir)
    assert exit_info.value.code == lifecycle.PREEMPTED_EXIT_CODE
    assert _final_classifier(workdir)[0] == 5
    monkeypatch.setattr(lifecycle, "should_stop", real_should_stop)
    resumed = le.train_and_evaluate(config, workdir)

    step_a, params_a = _final_classifier(tmp_path / "straight")
    step_b, params_b = _final_classifier(workdir)
    assert step_a == step_b == 12
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        np.testing.assert_array_equal(a, b)
    assert (resumed["top1"], resumed["top5"]) == (straight["top1"], straight["top5"])


def test_shard_map_equals_pmap(pretrained_workdir, tmp_path):
    results = {}
    for mode in ("pmap", "shard_map"):
        config = _linear_config(
            "quickstart", pretrained_workdir, total_steps=3, batch_size=16, parallel=mode
        )
        le.train_and_evaluate(config, str(tmp_path / mode))
        results[mode] = _final_classifier(tmp_path / mode)[1]
    for a, b in zip(*(jax.tree.leaves(r) for r in results.values()), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ bad input


def test_a_workdir_without_checkpoint_is_a_clear_error(pretrained_workdir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json in .*train first"):
        le.setup(_linear_config("quickstart", empty), str(tmp_path / "out"))
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(pretrained_workdir / "config.json", config_only / "config.json")
    with pytest.raises(ValueError, match="no checkpoint in .*config_only/checkpoints"):
        le.setup(_linear_config("quickstart", config_only), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="is the pre-training workdir"):
        le.setup(_linear_config("quickstart", pretrained_workdir), str(pretrained_workdir))
    with pytest.raises(
        ValueError, match="set one of --config.pretrained .* and --config.pretrained_workdir"
    ):
        le.setup(_linear_config("quickstart", ""), str(tmp_path / "out"))


def test_a_checkpoint_of_another_architecture_is_a_clear_error(pretrained_workdir, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(pretrained_workdir, edited)
    values = json.loads((edited / "config.json").read_text())
    values["num_filters"] *= 2  # the config now says a wider encoder than the checkpoint holds
    (edited / "config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match="written for a different model"):
        le.setup(_linear_config("quickstart", edited), str(tmp_path / "out"))


def test_data_without_labels_is_a_clear_error(pretrained_workdir, tmp_path):
    images = np.zeros((16, 16, 16, 3), np.uint8)
    arrays = {"train": {"images": images}, "test": {"images": images}}
    config = _linear_config("quickstart", pretrained_workdir, data__source="arrays")
    with pytest.raises(ValueError, match="split 'train' of the arrays passed in has no labels"):
        le.setup(config, str(tmp_path / "arrays"), arrays)

    config = _linear_config(
        "quickstart",
        pretrained_workdir,
        data__source="tfds",
        data__name="tiny_images",
        data__probe_split="unlabelled",
        data__data_dir=helpers.write_tiny_tfds(tmp_path / "tfds"),
    )
    with pytest.raises(ValueError, match="split 'unlabelled' of tfds dataset 'tiny_images' has no"):
        le.setup(config, str(tmp_path / "tiny"))
