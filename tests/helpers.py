"""Helpers for the tests (and the dev tools) that drive whole runs on a CPU: the repository's
config files with overrides, a tiny model, the environment of training subprocesses, and an
independent kNN to check reported accuracies against."""

from __future__ import annotations

import os
import pathlib

import ml_collections
import numpy as np

from byol_jax import default_config

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = {
    "encoder": "tiny",
    "projection_hidden_size": 32,
    "projection_size": 16,
    "progress_bar": False,
    # Test runs last a few steps: a warm-up of a tenth of the run, not of epochs of the data.
    "warmup_fraction": 0.1,
}
# The same, as train.py flags.
TINY_FLAGS = [f"--config.{k}={v}" for k, v in TINY.items()]


def load_config(name_or_path, *overrides, tiny: bool = True) -> ml_collections.ConfigDict:
    """``configs/<name>.py`` (or a path) with (dotted key, value) overrides applied, as
    ``--config.key=value`` would; ``tiny`` first shrinks the model to seconds-per-run size."""
    path = pathlib.Path(name_or_path)
    if path.suffix != ".py":
        path = REPO / "configs" / f"{name_or_path}.py"
    return default_config.from_file(path, *(TINY.items() if tiny else ()), *overrides)


def subprocess_env(devices: int = 8) -> dict[str, str]:
    """Environment for a ``python -m byol_jax.train`` child: forced host devices, the shared
    compilation cache, unbuffered output."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(REPO / ".cache" / "jax")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def knn_top1(bank, bank_labels, queries, labels, *, num_classes, k, temperature) -> float:
    """Weighted kNN top-1 in plain NumPy (float64): cosine similarity, the k nearest vote with
    weight exp(similarity / temperature). Independent of byol_jax's on-device kNN."""
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    similarity = unit(np.asarray(queries, np.float64)) @ unit(np.asarray(bank, np.float64)).T
    k = min(k, len(bank))
    nearest = np.argsort(-similarity, axis=-1, kind="stable")[:, :k]
    votes = np.zeros((len(queries), num_classes))
    for row, (index, sims) in enumerate(zip(nearest, np.take_along_axis(similarity, nearest, -1), strict=True)):  # fmt: skip
        np.add.at(votes[row], np.asarray(bank_labels)[index], np.exp(sims / temperature))
    return float(np.mean(np.argmax(votes, -1) == np.asarray(labels)))


def independent_knn(workdir, config) -> tuple[float, int]:
    """(kNN top-1, number of queries) of the trained state in ``workdir``, recomputed outside
    the training program: the state as ``pretrained.load`` gives it, embedded split by split,
    voted in NumPy."""
    from byol_jax import data as datasets  # noqa: PLC0415
    from byol_jax import features, pretrained  # noqa: PLC0415

    learner, state = pretrained.load(str(workdir))
    features = {
        split: features.embed_dataset(learner, state, config.data, split)
        for split in (datasets.probe_split(config.data), config.data.eval_split)
    }
    bank, queries = features.values()
    return knn_top1(
        bank["representations"],
        bank["labels"],
        queries["representations"],
        queries["labels"],
        num_classes=int(bank["labels"].max()) + 1,
        k=config.knn_k,
        temperature=config.knn_temperature,
    ), len(queries["labels"])


def write_tiny_tfds(root) -> str:
    """A real prepared TFDS dataset 'tiny_images' under ``root`` (no mock): 40 'train' and 12
    'test' 8x8 images whose pixels equal their label, and 8 'unlabelled' ones stored with
    label -1 as TFDS stores STL-10's. Returns the data_dir."""
    import tensorflow as tf  # noqa: PLC0415
    import tensorflow_datasets as tfds  # noqa: PLC0415

    version_dir = pathlib.Path(root) / "tiny_images" / "1.0.0"
    version_dir.mkdir(parents=True)
    features = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(8, 8, 3)),
            "label": tfds.features.ClassLabel(num_classes=40),
        }
    )
    split_infos = []
    for split, shards, per_shard in (("train", 2, 20), ("test", 2, 6), ("unlabelled", 1, 8)):
        for s in range(shards):
            name = f"tiny_images-{split}.tfrecord-{s:05d}-of-{shards:05d}"
            with tf.io.TFRecordWriter(str(version_dir / name)) as writer:
                for i in range(s * per_shard, (s + 1) * per_shard):
                    label = -1 if split == "unlabelled" else i
                    example = {"image": np.full((8, 8, 3), i, np.uint8), "label": label}
                    writer.write(features.serialize_example(example))
        lengths = [per_shard] * shards
        split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=lengths, num_bytes=0))
    tfds.folder_dataset.write_metadata(
        data_dir=str(version_dir), features=features, split_infos=split_infos
    )
    return str(root)


def write_authors_checkpoint(path, fields: dict, step: int = 0) -> None:
    """Pickles ``fields`` (online_params, target_params, online_state, target_state, opt_state)
    as the BYOL authors' checkpoints are: ``dict(experiment_state=<namedtuple>, step, rng)``,
    the named tuple made by dill's ``_create_namedtuple`` (emulated here: no dill needed)."""
    import collections  # noqa: PLC0415
    import pickle  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import types  # noqa: PLC0415

    names = ("online_params", "target_params", "online_state", "target_state", "opt_state")

    def _create_namedtuple(name, fieldnames, modulename, *rest):
        return collections.namedtuple(name, fieldnames)

    _create_namedtuple.__module__, _create_namedtuple.__qualname__ = (
        "dill._dill",
        "_create_namedtuple",
    )
    state_cls = collections.namedtuple("_ByolExperimentState", names)

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            if obj is state_cls:
                return _create_namedtuple, ("_ByolExperimentState", names, "byol.byol_experiment")
            return NotImplemented

    fake = {"dill": types.ModuleType("dill"), "dill._dill": types.ModuleType("dill._dill")}
    fake["dill._dill"]._create_namedtuple = _create_namedtuple
    saved = {name: sys.modules.get(name) for name in fake}
    sys.modules.update(fake)
    try:
        with open(path, "wb") as f:
            state = state_cls(*(fields.get(n, ()) for n in names))
            rng = np.zeros(2, np.uint32)
            Pickler(f, protocol=2).dump({"experiment_state": state, "step": step, "rng": rng})
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name)
            else:
                sys.modules[name] = module
