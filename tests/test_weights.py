"""Weights in and out of byol_jax: torchvision ResNets both ways and the BYOL authors'
checkpoints, against golden outputs written by tools/ scripts in environments with PyTorch
(tools/make_torchvision_golden.py) and with Haiku (tools/make_official_golden.py); the
commands that take them; and the errors a bad file gets."""

import pathlib
import pickle
import subprocess
import sys

import helpers
import jax
import numpy as np
import pytest

from byol_jax import builders, networks, pretrained
from byol_jax.programs import pretraining
from byol_jax.weights import official, torchvision

DATA = pathlib.Path(__file__).parent / "data"
TV_GOLDEN = DATA / "torchvision_golden.npz"
OFFICIAL = DATA / "official_tiny.pkl"
OFFICIAL_GOLDEN = DATA / "official_tiny_golden.npz"


def _random_encoder(depth=18, **kwargs):
    """A byol_jax ResNet with random parameters and statistics (nothing at its init value)."""
    encoder = networks.resnet(depth, **kwargs)
    variables = encoder.init(
        jax.random.key(depth), np.zeros((1, 64, 64, 3), np.float32), train=False
    )
    leaves, tree = jax.tree.flatten(variables)
    rng = np.random.default_rng(depth)
    leaves = [rng.uniform(0.5, 1.5, np.shape(x)).astype(np.float32) for x in leaves]
    variables = jax.tree.unflatten(tree, leaves)
    return encoder, variables["params"], variables["batch_stats"]


# ------------------------------------------------------------------------------ torchvision


@pytest.mark.parametrize("depth", [18, 50])
def test_byol_jax_to_torchvision_to_byol_jax_is_exact(tmp_path, depth):
    _, params, stats = _random_encoder(depth)
    path = tmp_path / f"resnet{depth}.safetensors"
    torchvision.save(path, torchvision.from_byol_jax(params, stats))
    learner, state = pretrained.load(f"torchvision:{path}")
    assert learner.encoder.stage_sizes == networks._STAGES[depth][0] and learner.num_classes is None
    for ours, back in ((params, state.online_params["encoder"]), (stats, state.online_batch_stats["encoder"])):  # fmt: skip
        jax.tree.map(np.testing.assert_array_equal, back, ours)
    jax.tree.map(np.testing.assert_array_equal, state.target_params["encoder"], params)


def _weights_from_golden(golden, depth) -> dict[str, np.ndarray]:
    """The torchvision state dict tools/make_torchvision_golden.py filled, regenerated from
    NumPy seeds (its documented rule), so no weights are committed."""
    sys.path.insert(0, str(helpers.REPO / "tools"))
    from make_torchvision_golden import numpy_weights  # noqa: PLC0415 (NumPy only)

    keys = [str(k) for k in golden[f"resnet{depth}/keys"]]
    shapes = [
        tuple(int(n) for n in str(s).split(",") if n) for s in golden[f"resnet{depth}/shapes"]
    ]
    dtypes = [str(d) for d in golden[f"resnet{depth}/dtypes"]]
    weights = numpy_weights(depth, list(zip(keys, shapes, strict=True)))
    assert {k: str(v.dtype) for k, v in weights.items()} == dict(zip(keys, dtypes, strict=True))
    return weights


needs_tv_golden = pytest.mark.skipif(not TV_GOLDEN.exists(), reason=f"{TV_GOLDEN} not written yet")


@needs_tv_golden
@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_weights_give_torchvisions_outputs(tmp_path, depth):
    golden = np.load(TV_GOLDEN)
    path = tmp_path / "weights.safetensors"
    torchvision.save(path, _weights_from_golden(golden, depth))
    learner, state = pretrained.load(f"torchvision:{path}")
    features = learner.embed(state, golden["inputs"].astype(np.float32))  # ImageNet-normalised
    probe = state.online_params["probe"]
    logits = np.asarray(features) @ np.asarray(probe["kernel"]) + np.asarray(probe["bias"])
    # The golden weights' BatchNorms run on made-up statistics, so activations grow to ~3e4 in
    # ResNet-50: 1e-4 of the largest value (measured differences: ~1e-6 of it).
    for ours, name in ((features, "features"), (logits, "logits")):
        expected = golden[f"resnet{depth}/{name}"]
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


@needs_tv_golden
@pytest.mark.parametrize("depth", [18, 50])
def test_the_export_has_exactly_torchvisions_keys_shapes_and_dtypes(depth):
    """What load_state_dict(strict=True) checks: the same keys, shapes and dtypes (the real
    strict load runs in tools/make_torchvision_golden.py --check-export)."""
    golden = np.load(TV_GOLDEN)
    _, params, stats = _random_encoder(depth)
    features = 512 if depth == 18 else 2048
    head = {"kernel": np.ones((features, 1000), np.float32), "bias": np.zeros(1000, np.float32)}
    exported = torchvision.from_byol_jax(params, stats, head)
    keys = [str(k) for k in golden[f"resnet{depth}/keys"]]
    shapes = [
        tuple(int(n) for n in str(s).split(",") if n) for s in golden[f"resnet{depth}/shapes"]
    ]
    assert list(exported) == keys or sorted(exported) == sorted(keys)
    assert {k: tuple(v.shape) for k, v in exported.items()} == dict(zip(keys, shapes, strict=True))
    dtypes = {str(k): str(d) for k, d in zip(keys, golden[f"resnet{depth}/dtypes"], strict=True)}
    assert {k: str(v.dtype) for k, v in exported.items()} == dtypes


def test_export_command_writes_a_workdir_encoder_and_refuses_what_torchvision_lacks(tmp_path):
    config = helpers.load_config("quickstart", ("encoder", "resnet18"), ("num_filters", 64), ("cifar_stem", False), ("image_size", 32))  # fmt: skip
    learner = builders.build_learner(config, 10, 10)
    state = learner.init(jax.random.key(0), builders.sample_images(config), builders.build_optimizer(config, 10, 10))  # fmt: skip
    tensors = torchvision.from_learner(learner, state, with_head=True)
    assert tensors["fc.weight"].shape == (10, 512) and tensors["conv1.weight"].shape == (
        64,
        3,
        7,
        7,
    )
    assert tensors["layer1.0.bn1.num_batches_tracked"].dtype == np.int64
    small = helpers.load_config("quickstart")  # the tiny ResNet with the 3x3 stem
    tiny = builders.build_learner(small, 10, 10)
    tiny_state = tiny.init(jax.random.key(0), builders.sample_images(small), builders.build_optimizer(small, 10, 10))  # fmt: skip
    with pytest.raises(torchvision.TorchvisionWeightsError, match=r"7x7 stem.*'cifar_stem': True"):
        torchvision.from_learner(tiny, tiny_state)


def test_bad_torchvision_files_are_clear_errors(tmp_path):
    _, params, stats = _random_encoder(18)
    good = torchvision.from_byol_jax(params, stats)
    path = tmp_path / "r18.safetensors"
    torchvision.save(path, good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(torchvision.TorchvisionWeightsError, match="may be truncated"):
        pretrained.load(f"torchvision:{truncated}")
    odd = {k: v for k, v in good.items() if not k.startswith("layer4.1.")}
    torchvision.save(tmp_path / "odd.safetensors", odd)
    with pytest.raises(torchvision.TorchvisionWeightsError, match=r"unknown architecture: basic blocks per layer \(2, 2, 2, 1\)"):  # fmt: skip
        pretrained.load(f"torchvision:{tmp_path / 'odd.safetensors'}")
    missing = {k: v for k, v in good.items() if k != "layer1.0.bn1.weight"}
    torchvision.save(tmp_path / "missing.safetensors", missing)
    with pytest.raises(pretrained.PretrainedError, match=r"lacks online_params/encoder\['stage1_block1'\]\['BatchNorm_0'\]\['scale'\]"):  # fmt: skip
        pretrained.load(f"torchvision:{tmp_path / 'missing.safetensors'}")
    _, wide, wide_stats = _random_encoder(18, num_filters=32)
    torchvision.save(tmp_path / "wide.safetensors", torchvision.from_byol_jax(wide, wide_stats))
    with pytest.raises(pretrained.PretrainedError, match=r"is \(32,\) in torchvision:.*wide.safetensors but \(64,\) in the learner: a different width"):  # fmt: skip
        pretrained.load(f"torchvision:{tmp_path / 'wide.safetensors'}")
    (tmp_path / "model.pth").write_bytes(b"not a torch file")
    with pytest.raises(torchvision.TorchvisionWeightsError, match=r"needs PyTorch.*pip install torch|cannot read"):  # fmt: skip
        pretrained.load(f"torchvision:{tmp_path / 'model.pth'}")


def test_training_starts_from_imported_weights(tmp_path):
    """Fine-tuning / continued pre-training: a fresh run's encoder starts as the file's."""
    _, params, stats = _random_encoder(18)
    path = tmp_path / "r18.safetensors"
    torchvision.save(path, torchvision.from_byol_jax(params, stats))
    overrides = [("encoder", "resnet18"), ("num_filters", 64), ("cifar_stem", False), ("image_size", 32), ("total_steps", 1), ("batch_size", 16), ("knn_at_end", False), ("pretrained", f"torchvision:{path}")]  # fmt: skip
    config = helpers.load_config("quickstart", *overrides)
    run = pretraining.setup(config, str(tmp_path / "run"))
    fresh = run.learner.init(jax.random.key(0), builders.sample_images(config), run.tx)
    placed = pretrained.place(fresh, pretrained.weights(config.pretrained), where="test")
    jax.tree.map(np.testing.assert_array_equal, placed.online_params["encoder"], params)
    jax.tree.map(np.testing.assert_array_equal, placed.online_params["projector"], fresh.online_params["projector"])  # fmt: skip
    with pytest.raises(ValueError, match=r"authors' weights, trained with 'same' padding: set --config.padding=same"):  # fmt: skip
        pretraining.setup(helpers.load_config("quickstart", ("pretrained", f"official:{OFFICIAL}")), str(tmp_path / "x"))  # fmt: skip


# ------------------------------------------------------------------------------ the authors'

needs_official = pytest.mark.skipif(not OFFICIAL_GOLDEN.exists(), reason=f"{OFFICIAL_GOLDEN} not written yet")  # fmt: skip


@needs_official
@pytest.mark.parametrize("batch", ["", "_64x48"])  # 64x48: strided SAME padding, H != W
def test_the_authors_checkpoint_gives_their_networks_outputs(batch):
    golden = np.load(OFFICIAL_GOLDEN)
    learner, state = pretrained.load(f"official:{OFFICIAL}")
    assert learner.encoder.padding == "same" and learner.num_classes == 10
    images = golden[f"images{batch}"]  # uint8: embed normalises as their model does inside
    for network in ("online", "target"):
        projection, representation = learner.embed(state, images, return_projection=True, use_target=network == "target")  # fmt: skip
        params = getattr(state, f"{network}_params")

        def close(ours, key, network=network):
            expected = golden[f"{network}_{key}{batch}"]
            # Haiku's and XLA's float32 sums run in different orders, by CPU: 1.7e-5 at most
            # on an avx512_fp16 CPU (within 1e-5 on the earlier sessions' CPU).
            np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=5e-5)

        close(representation, "representation")
        close(projection, "projection")
        if network == "online":  # the target network has no predictor or classifier here
            stats = state.online_batch_stats["predictor"]
            prediction = learner.predictor.apply({"params": params["predictor"], "batch_stats": stats}, projection, train=False)  # fmt: skip
            close(prediction, "prediction")
            probe = params["probe"]
            close(np.asarray(representation) @ np.asarray(probe["kernel"]) + np.asarray(probe["bias"]), "logits")  # fmt: skip


def _rewritten(tmp_path, change) -> str:
    """The tiny authors' checkpoint with ``change(online_params)`` applied, written in their
    layout again."""
    data = official.read(str(OFFICIAL))
    change(data["online_params"])
    path = tmp_path / "changed.pkl"
    helpers.write_authors_checkpoint(path, data, step=1)
    return f"official:{path}"


@needs_official
def test_bad_authors_checkpoints_are_clear_errors(tmp_path):
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(OFFICIAL.read_bytes()[: OFFICIAL.stat().st_size // 2])
    with pytest.raises(official.OfficialCheckpointError, match="may be truncated"):
        pretrained.load(f"official:{truncated}")
    unknown = lambda params: params.update(
        {"res_net50/~/block_group_0/~/block_0/~/attention": {"w": np.zeros(3)}}
    )  # noqa: E731
    with pytest.raises(official.OfficialCheckpointError, match=r"cannot place the checkpoint's module 'res_net50/~/block_group_0/~/block_0/~/attention'"):  # fmt: skip
        pretrained.load(_rewritten(tmp_path, unknown))
    missing = lambda params: params.pop("projector/linear_1")  # noqa: E731
    with pytest.raises(official.OfficialCheckpointError, match=r"no 'projector/linear_1'"):
        pretrained.load(_rewritten(tmp_path, missing))

    def wider(params):
        key = next(k for k in params if k.endswith("block_group_0/~/block_0/~/conv_1"))
        params[key]["w"] = np.zeros(
            (3, 3) + tuple(2 * n for n in params[key]["w"].shape[2:]), np.float32
        )

    with pytest.raises(pretrained.PretrainedError, match=r"\['stage1_block1'\]\['Conv_1'\]\['kernel'\] is .* a different width or depth"):  # fmt: skip
        pretrained.load(_rewritten(tmp_path, wider))
    not_theirs = tmp_path / "other.pkl"
    not_theirs.write_bytes(pickle.dumps({"experiment_state": 3}))
    with pytest.raises(official.OfficialCheckpointError, match="a pickle but not an authors' BYOL checkpoint"):  # fmt: skip
        pretrained.load(f"official:{not_theirs}")


@needs_official
def test_embed_and_linear_evaluation_commands_take_the_authors_checkpoint(tmp_path):
    source = f"official:{OFFICIAL}"
    env = helpers.subprocess_env()
    embed = [sys.executable, "-m", "byol_jax.embed", "--pretrained", source, "--out", str(tmp_path / "e.npz"), "--data.source=digits", "--split=test", "--batch_size=128"]  # fmt: skip
    result = subprocess.run(embed, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    arrays = np.load(tmp_path / "e.npz")
    assert arrays["representations"].shape == (360, 128)  # the tiny network's 128-d pool
    linear = [sys.executable, "-m", "byol_jax.linear_eval", "--config", str(helpers.REPO / "configs" / "linear_eval" / "quickstart.py"), f"--config.pretrained={source}", "--config.image_size=32", "--config.total_steps=4", "--config.batch_size=32", "--config.progress_bar=False", "--workdir", str(tmp_path / "linear")]  # fmt: skip
    result = subprocess.run(linear, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"encoder of {source}" in result.stdout and "top-1" in result.stdout
