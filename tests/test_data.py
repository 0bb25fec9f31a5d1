"""Host input pipeline: shapes, exact resume, process shards, padding, host crops equal to
device crops, sources of one's own, real data and errors."""

import io
import itertools
import os
import pathlib
import subprocess
import sys
import tarfile

import helpers
import jax
import numpy as np
import pytest

from byol_jax import data as datasets
from byol_jax import image_ops
from byol_jax.data import ordering, tf_ops
from byol_jax.data.folder import list_folder

SHARED_CIFAR = pathlib.Path(__file__).parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer"]
CIFAR_CLASSES += ["dog", "frog", "horse", "ship", "truck"]
# Host crops are uint8, device crops float: measured at most 0.50006 / 255 apart (the uint8
# rounding plus float32 differences of the resizes, bounded by test_image_ops.RESIZE_ATOL), for
# the numpy path and TF's (JPEG window and PNG), shrinking and growing boxes.
HOST_ATOL = 0.5 / 255 + 1e-5

device_resize = jax.jit(image_ops.crop_and_resize, static_argnums=(2, 3))


def _config(**overrides):
    data = datasets.default_data_config()
    data.update(overrides)
    return data


def _take(batches, n):
    return [next(batches) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _save(path, array, **options):
    from PIL import Image

    Image.fromarray(array).save(path, **options)


def _index_arrays(n, size=12):
    """Images whose every pixel is the example index, labels = index."""
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, size, size, 3))
    return {"train": {"images": images.copy(), "labels": np.arange(n)}}


def _texture(h, w, seed=0):
    """A smooth image with noise: crops differ, JPEG keeps it close."""
    y, x = np.mgrid[:h, :w]
    image = np.stack(
        [127 + 90 * np.sin(x / 5 + y / 7), 127 + 90 * np.cos(x / 4 - y / 6), 6 * x], -1
    )
    image = image + np.random.default_rng(seed).normal(0, 15, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory):
    """split/class/i.png; image i of a split is constant 4 * i, its size varies."""
    root = tmp_path_factory.mktemp("png_folder")
    for split, per_class in (("train", 6), ("test", 3)):
        for c, name in enumerate(("a", "b", "c")):
            (root / split / name).mkdir(parents=True)
            for j in range(per_class):
                i = c * per_class + j
                shape = (20 + 2 * j, 30 - j, 3)
                _save(root / split / name / f"{i:02d}.png", np.full(shape, 4 * i, np.uint8))
    return root


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    """A real prepared TFDS dataset (no mock): 40 train / 12 test 8x8 images, pixel = label,
    and 8 unlabelled ones (label -1)."""
    root = helpers.write_tiny_tfds(tmp_path_factory.mktemp("tfds"))
    return _config(source="tfds", name="tiny_images", data_dir=root, shuffle_buffer=8)


@pytest.fixture(scope="module")
def cifar_subset(tmp_path_factory):
    """20 images per class per split of the shared CIFAR-10 JPEGs."""
    if not SHARED_CIFAR.exists():
        pytest.skip(f"{SHARED_CIFAR} not found: the CIFAR-10 JPEG tests need the shared data")
    root = tmp_path_factory.mktemp("cifar")
    with tarfile.open(SHARED_CIFAR) as tar:
        for member in tar:
            parts = pathlib.PurePosixPath(member.name).parts
            if member.isfile() and len(parts) == 3 and int(parts[2].split(".")[0]) < 20:
                (root / parts[0] / parts[1]).mkdir(parents=True, exist_ok=True)
                (root / member.name).write_bytes(tar.extractfile(member).read())
    return root


# ----------------------------------------------------------------------------- numpy sources


def test_numpy_sources_do_not_import_tensorflow():
    code = (
        "import sys; from byol_jax import data\n"
        "assert 'tensorflow' not in sys.modules\n"
        "batch = next(data.pretrain_batches(data.default_data_config(), global_batch_size=4,"
        " image_size=8, seed=0))\n"
        "assert batch['images'].shape == (4, 8, 8, 3)\n"
        "arrays = {'train': {'images': __import__('numpy').zeros((3, 9, 9, 3), 'uint8')}}\n"
        "config = data.default_data_config(); config.update(source='arrays', host_crop=True)\n"
        "next(data.pretrain_batches(config, global_batch_size=2, image_size=8, seed=0,"
        " arrays=arrays))\n"
        "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_digits_splits_pixels_and_labels():
    from sklearn.datasets import load_digits

    data = _config(source="digits")
    info = datasets.dataset_info(data)
    assert info["num_examples"] == {"train": 1437, "test": 360}
    assert info["num_classes"] == 10 and info["image_shape"] == (8, 8, 1)
    pixels, labels = load_digits(return_X_y=True)
    expected = np.round(pixels.reshape(-1, 8, 8) * 255 / 16).astype(np.uint8)
    seen = []
    for split in ("train", "test"):
        for batch in datasets.eval_batches(data, split=split, batch_size=500, image_size=8):
            images, rows = batch["images"][batch["mask"]], batch["labels"][batch["mask"]]
            assert (images == images[..., :1]).all()  # grey repeated to 3 channels
            seen += [(img[..., 0].tobytes(), int(y)) for img, y in zip(images, rows, strict=True)]
    # The two splits partition the dataset: same (image, label) multiset.
    assert sorted(seen) == sorted(
        (x.tobytes(), int(y)) for x, y in zip(expected, labels, strict=True)
    )
    test = datasets.eval_batches(data, split="test", batch_size=90, image_size=8)
    per_class = np.bincount(np.concatenate([b["labels"][b["mask"]] for b in test]), minlength=10)
    np.testing.assert_allclose(per_class, 0.2 * np.bincount(labels), atol=1)  # stratified
    big = next(datasets.pretrain_batches(data, global_batch_size=8, image_size=32, seed=0))
    assert big["images"].shape == (8, 32, 32, 3) and big["images"].dtype == np.uint8


@pytest.mark.parametrize("mode", ["plain", "views", "linear"])
def test_arrays_resume_is_exact(mode):
    data, arrays = _config(source="arrays", host_crop=mode == "views"), _index_arrays(10)
    make = datasets.linear_eval_batches if mode == "linear" else datasets.pretrain_batches
    kwargs = dict(global_batch_size=4, image_size=8, seed=3, arrays=arrays)
    batches = _take(make(data, **kwargs), 6)  # 24 positions: 2.4 epochs
    for k in (1, 3, 5):
        _assert_batches_equal(batches[k], next(make(data, start_step=k, **kwargs)))
    labels = np.concatenate([b["labels"] for b in batches])
    assert sorted(labels[:10]) == list(range(10))  # each epoch is a permutation
    assert sorted(labels[10:20]) == list(range(10))
    assert not np.array_equal(labels[:10], labels[10:20])  # reshuffled every epoch
    images = batches[0]["views"] if mode == "views" else batches[0]["images"]
    assert images.dtype == np.uint8
    assert (images == batches[0]["labels"][:, None, None, None]).all()  # image and label agree


def _assert_crops_differ(views):
    """views [2, B, S, S, 3] of one repeated image: every crop is a different box."""
    flat = views.reshape(-1, views[0, 0].size).astype(int)
    gaps = np.abs(flat[:, None] - flat[None]).mean(-1)
    assert gaps[~np.eye(len(flat), dtype=bool)].min() > 0.5


@pytest.mark.parametrize("host_crop", [False, True])
def test_arrays_process_shards_make_the_global_batch(host_crop):
    data, arrays = _config(source="arrays", host_crop=host_crop), _index_arrays(40)
    kwargs = dict(global_batch_size=8, image_size=8, seed=1, arrays=arrays)
    whole = _take(datasets.pretrain_batches(data, **kwargs), 6)
    parts = [
        _take(datasets.pretrain_batches(data, process_index=p, process_count=2, **kwargs), 6)
        for p in (0, 1)
    ]
    key, axis = ("views", 1) if host_crop else ("images", 0)
    for step, batch in enumerate(whole):
        p0, p1 = parts[0][step], parts[1][step]
        assert not set(p0["labels"]) & set(p1["labels"])
        np.testing.assert_array_equal(np.concatenate([p0["labels"], p1["labels"]]), batch["labels"])
        np.testing.assert_array_equal(np.concatenate([p0[key], p1[key]], axis), batch[key])


def test_eval_padding_mask_and_process_parts():
    data, arrays = _config(source="arrays"), _index_arrays(10, size=8)
    eval_batches = lambda **kw: list(
        datasets.eval_batches(data, split="train", image_size=8, arrays=arrays, **kw)
    )
    batches = eval_batches(batch_size=4)
    assert [b["mask"].sum() for b in batches] == [4, 4, 2]
    last = batches[-1]
    assert (last["labels"][2:] == -1).all() and (last["images"][2:] == 0).all()
    labels = np.concatenate([b["labels"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(labels, np.arange(10))  # in order
    seen = []
    for p in range(4):  # parts of 3, 3, 2, 2 rows: every process yields 2 batches of 2
        part = eval_batches(batch_size=2, process_index=p, process_count=4)
        assert len(part) == 2
        seen += [int(y) for b in part for y in b["labels"][b["mask"]]]
    assert sorted(seen) == list(range(10))


def _host_boxes_equal_device_crops(views, images, positions, rngs, data, size):
    """Every host view equals the device's crop of the box the host drew, within HOST_ATOL.
    Returns the sides of those boxes."""
    sides = []
    for view in range(2):
        for row, (image, g) in enumerate(zip(images, positions, strict=True)):
            u = rngs(int(g), view)
            box = image_ops.sample_crop_box(u, *image.shape[:2], data.crop_area, data.crop_ratio)
            device = np.asarray(device_resize(image, box, size, data.resize_method))
            np.testing.assert_allclose(views[view, row] / 255, device, atol=HOST_ATOL, rtol=0)
            sides += list(box[2:])
    return np.array(sides)


@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
def test_numpy_host_crops_are_the_device_crops_of_their_boxes(method):
    images = np.stack([_texture(24, 30, seed=i) for i in range(4)])
    data = _config(source="arrays", host_crop=True, resize_method=method)
    arrays = {"train": {"images": images}}
    batch = next(
        datasets.pretrain_batches(data, global_batch_size=4, image_size=16, seed=7, arrays=arrays)
    )
    positions = ordering.stream_positions(0, 4, 0, 1)
    rows = ordering.example_indices(7, positions, 4)
    uniforms = lambda g, view: ordering.example_rng(7, g, view).random((4, 10), dtype=np.float32)
    sides = _host_boxes_equal_device_crops(
        batch["views"], images[rows], positions, uniforms, data, 16
    )
    assert sides.min() < 16 < sides.max()  # both shrunk and grown boxes


def test_arrays_host_crops_differ_between_views_and_examples():
    arrays = {"train": {"images": np.stack([_texture(40, 30)] * 6)}}
    data = _config(source="arrays", host_crop=True)
    batch = next(
        datasets.pretrain_batches(data, global_batch_size=6, image_size=16, seed=0, arrays=arrays)
    )
    assert batch["views"].shape == (2, 6, 16, 16, 3)
    assert (batch["labels"] == -1).all()
    _assert_crops_differ(batch["views"])


@pytest.mark.parametrize("form", ["jpg", "png"])
def test_tf_host_crops_are_the_device_crops_of_their_boxes(tmp_path, form):
    """The folder source's TF crops (JPEG: decoded window only) against jax's resize of the
    whole decoded image, for the boxes the host drew from its keys."""
    import tensorflow as tf

    for i in range(4):
        _save(tmp_path / f"{i}.{form}", _texture(40, 56, seed=i), quality=90)
    data = _config(source="folder", folder=str(tmp_path), host_crop=True)
    batch = next(datasets.pretrain_batches(data, global_batch_size=4, image_size=32, seed=5))
    positions = ordering.stream_positions(0, 4, 0, 1)
    paths = list_folder(str(tmp_path)).splits["*"][0][ordering.example_indices(5, positions, 4)]
    decode = lambda p: tf.io.decode_image(tf.io.read_file(str(tmp_path / os.fsdecode(p)))).numpy()
    # The pipeline's key: fold_in([seed, stream], int64 position), then fold_in(key, view).
    fold = lambda g: tf.random.fold_in(tf.constant([5, 0], tf.int64), tf.constant(g, tf.int64))
    key = lambda g, view: tf.random.fold_in(fold(g), view)
    uniforms = lambda g, view: tf.random.stateless_uniform([4, 10], key(g, view)).numpy()
    images = [decode(p) for p in paths]
    sides = _host_boxes_equal_device_crops(batch["views"], images, positions, uniforms, data, 32)
    assert sides.min() < 32 < sides.max()  # both shrunk and grown boxes


def test_jpeg_window_decode_is_the_full_decode():
    """decode_and_crop_jpeg differs from decode + crop only on a window's outer row or column
    inside the image (chroma upsampling lacks the neighbour there), which the crop window's
    one pixel beyond the kernel's support keeps at zero weight: the crops are equal, up to
    the rounding of a uint8 tie (measured: 1 level on 0.003 % of the pixels, never more)."""
    import tensorflow as tf

    buffer = io.BytesIO()
    _save(buffer, _texture(90, 120, seed=3), format="JPEG", quality=85)
    encoded = tf.constant(buffer.getvalue())
    full = tf.io.decode_jpeg(encoded, channels=3)
    rng = np.random.default_rng(0)
    window = tf.io.decode_and_crop_jpeg(encoded, [10, 21, 50, 60], channels=3).numpy()
    np.testing.assert_array_equal(window[1:-1, 1:-1], full.numpy()[11:59, 22:80])
    off = 0
    for u in rng.random((20, 4, 10), dtype=np.float32):
        box = image_ops.sample_crop_box(u, 90, 120, (0.02, 1.0), (0.5, 2.0))
        for size in (16, 64):
            from_window = tf_ops.crops(encoded, lambda h, w, box=box: [box], size, "bicubic")[0]
            from_full = tf_ops.crop_and_resize(full, box, size, "bicubic")
            diff = np.abs(from_window.numpy().astype(int) - from_full.numpy())
            assert diff.max() <= 1
            off += (diff > 0).sum()
    assert off <= 1e-3 * 20 * (16**2 + 64**2) * 3


# ----------------------------------------------------------------------------- a source of one's own


class RampSource(datasets.Source):
    """Split 'all': N = 9 images of 6 x 6 whose pixels are their index, labels index % 3."""

    def describe(self):
        return "the ramp"

    def info(self):
        return {"num_examples": {"all": 9}, "num_classes": 3, "class_names": None,
                "image_shape": (6, 6, 3)}  # fmt: skip

    def has_labels(self, split):
        return True

    def _rows(self, rows):
        images = np.broadcast_to(rows.astype(np.uint8)[:, None, None, None], (len(rows), 6, 6, 3))
        return {"images": images.copy(), "labels": (rows % 3).astype(np.int32)}

    def train_batches(self, mode, split, *, batch, image_size, seed, start_step, process_index,
                      process_count):  # fmt: skip
        for step in itertools.count(start_step):
            positions = ordering.stream_positions(step, batch, process_index, process_count)
            yield self._rows(ordering.example_indices(seed, positions, 9))

    def eval_batches(self, split, *, batch_size, image_size, process_index, process_count):
        rows = ordering.eval_rows(9, process_index, process_count)
        parts = (self._rows(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size))
        return datasets.EvalPart(parts, 9, file_names=False)


def test_a_registered_source_feeds_the_public_functions():
    datasets.register_source("ramp", RampSource, replace=True)
    assert "ramp" in datasets.SOURCES
    data = _config(source="ramp")
    datasets.check_data_config(data)
    assert datasets.dataset_info(data)["num_classes"] == 3
    assert datasets.require_labels(data, "all") == 3
    batches = _take(datasets.pretrain_batches(data, global_batch_size=3, image_size=6, seed=0), 3)
    assert sorted(np.concatenate([b["images"][:, 0, 0, 0] for b in batches])) == list(range(9))
    evals = list(datasets.eval_batches(data, split="all", batch_size=2, image_size=6,
                                       process_index=1, process_count=2))  # fmt: skip
    assert [b["mask"].sum() for b in evals] == [2, 2, 0]  # rows 5..8, padded to ceil(5 / 2)
    np.testing.assert_array_equal(evals[1]["labels"], [7 % 3, 8 % 3])
    with pytest.raises(TypeError, match="Source subclass"):
        datasets.register_source("bad", dict)
    with pytest.raises(ValueError, match="already registered"):
        datasets.register_source("tfds", RampSource)


# ----------------------------------------------------------------------------- folder


def test_folder_resume_shards_and_labels(png_folder):
    data = _config(source="folder", folder=str(png_folder))
    info = datasets.dataset_info(data)
    assert info["num_examples"] == {"train": 18, "test": 9}
    assert info["class_names"] == ["a", "b", "c"] and info["num_classes"] == 3
    kwargs = dict(global_batch_size=4, image_size=16, seed=2)
    batches = _take(datasets.pretrain_batches(data, **kwargs), 6)
    _assert_batches_equal(batches[5], next(datasets.pretrain_batches(data, start_step=5, **kwargs)))
    for batch in batches:
        index = batch["images"][:, 0, 0, 0] // 4  # every pixel is 4 * index
        assert (batch["images"] == (4 * index)[:, None, None, None]).all()
        np.testing.assert_array_equal(batch["labels"], index // 6)  # 6 images per class
    p1 = _take(datasets.pretrain_batches(data, process_index=1, process_count=2, **kwargs), 6)
    for batch, part in zip(batches, p1, strict=True):  # process 1 holds rows 2, 3 of each batch
        np.testing.assert_array_equal(part["images"], batch["images"][2:])
    epoch = np.concatenate([b["images"][:, 0, 0, 0] for b in batches])[:18] // 4
    assert sorted(epoch) == list(range(18))


def test_folder_host_crop_resume(png_folder):
    data = _config(source="folder", folder=str(png_folder), host_crop=True)
    kwargs = dict(global_batch_size=2, image_size=12, seed=5)
    batches = _take(datasets.pretrain_batches(data, **kwargs), 4)
    assert batches[0]["views"].shape == (2, 2, 12, 12, 3)
    _assert_batches_equal(batches[3], next(datasets.pretrain_batches(data, start_step=3, **kwargs)))
    linear = _take(datasets.linear_eval_batches(data, **kwargs), 3)
    resumed = next(datasets.linear_eval_batches(data, start_step=2, **kwargs))
    _assert_batches_equal(linear[2], resumed)


def test_folder_eval_names_labels_and_padding(png_folder):
    data = _config(source="folder", folder=str(png_folder))
    batches = list(datasets.eval_batches(data, split="test", batch_size=4, image_size=16))
    assert [b["mask"].sum() for b in batches] == [4, 4, 1]
    names = np.concatenate([b["file_names"][b["mask"]] for b in batches])
    assert list(names) == sorted(names) and names[0] == os.path.join("test", "a", "00.png")
    assert batches[-1]["file_names"][1] == ""
    for batch in batches:
        for image, label, name, real in zip(
            *(batch[k] for k in ("images", "labels", "file_names", "mask")), strict=True
        ):
            if real:
                index = int(pathlib.Path(name).stem)
                assert pathlib.Path(name).parent.name == "abc"[label]
                assert (image == 4 * index).all()


def test_folder_host_crops_differ_between_views_and_examples(tmp_path):
    for i in range(4):
        _save(tmp_path / f"{i}.png", _texture(40, 30))
    data = _config(source="folder", folder=str(tmp_path), host_crop=True)
    batch = next(datasets.pretrain_batches(data, global_batch_size=4, image_size=16, seed=0))
    _assert_crops_differ(batch["views"])


def test_flat_folder_is_unlabelled(tmp_path):
    for i in range(5):
        _save(tmp_path / f"é{i}.jpg", np.full((20, 20, 3), 50 * i, np.uint8))
    data = _config(source="folder", folder=str(tmp_path))
    info = datasets.dataset_info(data)
    assert info["num_classes"] is None and info["num_examples"] == {"train": 5, "test": 5}
    batch = next(datasets.pretrain_batches(data, global_batch_size=5, image_size=20, seed=0))
    assert (batch["labels"] == -1).all()
    batches = list(datasets.eval_batches(data, split="anything", batch_size=8, image_size=20))
    assert batches[0]["mask"].sum() == 5
    assert list(batches[0]["file_names"][:5]) == [f"é{i}.jpg" for i in range(5)]
    with pytest.raises(ValueError, match="has no labels"):
        datasets.require_labels(data, "train")
    with pytest.raises(ValueError, match="has no labels"):
        datasets.linear_eval_batches(data, global_batch_size=4, image_size=20, seed=0)


def test_folder_missing_empty_or_imageless(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        datasets.dataset_info(_config(source="folder", folder=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        datasets.dataset_info(_config(source="folder", folder=str(tmp_path / "empty")))
    (tmp_path / "text" / "train" / "a").mkdir(parents=True)
    (tmp_path / "text" / "train" / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no image files"):
        datasets.dataset_info(_config(source="folder", folder=str(tmp_path / "text")))


def test_folder_unknown_split(png_folder):
    data = _config(source="folder", folder=str(png_folder))
    with pytest.raises(ValueError, match=r"split 'val' is not in .* it has \['test', 'train'\]"):
        datasets.eval_batches(data, split="val", batch_size=2, image_size=8)


def test_folder_corrupt_jpeg_is_named(tmp_path):
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    for i in range(3):
        _save(folder / f"good{i}.jpg", np.full((9, 9, 3), 10, np.uint8))
    buffer = io.BytesIO()
    _save(buffer, np.zeros((9, 9, 3), np.uint8), format="JPEG")
    (folder / "bad.jpg").write_bytes(buffer.getvalue()[:40])  # truncated JPEG
    data = _config(source="folder", folder=str(tmp_path), host_crop=True)
    with pytest.raises(ValueError, match="bad.jpg"):
        _take(datasets.pretrain_batches(data, global_batch_size=2, image_size=8, seed=0), 4)
    with pytest.raises(ValueError, match="bad.jpg"):
        list(datasets.eval_batches(data, split="train", batch_size=2, image_size=8))


def test_cifar10_jpeg_folder(cifar_subset):
    import tensorflow_datasets as tfds
    from PIL import Image

    data = _config(source="folder", folder=str(cifar_subset))
    info = datasets.dataset_info(data)
    assert info["class_names"] == CIFAR_CLASSES
    assert info["class_names"] == tfds.ImageFolder(str(cifar_subset)).info.features["label"].names
    assert info["num_examples"] == {"train": 200, "test": 200}
    images, count = np.zeros(3), 0
    for batch in datasets.eval_batches(data, split="train", batch_size=64, image_size=32):
        rows = batch["mask"]
        for name, label in zip(batch["file_names"][rows], batch["labels"][rows], strict=True):
            assert pathlib.Path(name).parts[:2] == ("train", CIFAR_CLASSES[label])
        images += batch["images"][rows].astype(np.float64).sum((0, 1, 2))
        count += rows.sum() * 32 * 32
        first = batch
    np.testing.assert_allclose(images / count, [125.3, 122.9, 113.9], atol=12)
    expected = np.asarray(Image.open(cifar_subset / first["file_names"][0]).convert("RGB"))
    assert np.abs(first["images"][0].astype(int) - expected).mean() < 1.5  # TF vs PIL libjpeg
    batch = next(datasets.pretrain_batches(data, global_batch_size=8, image_size=32, seed=0))
    assert batch["images"].shape == (8, 32, 32, 3) and set(batch["labels"]) <= set(range(10))


# ----------------------------------------------------------------------------- tfds


def test_tfds_processes_read_disjoint_parts_and_resume(tiny_tfds):
    data = tiny_tfds
    kwargs = dict(global_batch_size=8, image_size=8, seed=4)
    epoch = {}
    for p in (0, 1):
        shard = dict(process_index=p, process_count=2, **kwargs)
        batches = _take(datasets.pretrain_batches(data, **shard), 10)
        labels = np.concatenate([b["labels"] for b in batches])
        for b in batches:
            assert (b["images"] == b["labels"][:, None, None, None]).all()
        epoch[p] = labels[:20]  # each process's part is 20 examples
        assert sorted(labels[:20]) == sorted(labels[20:40])  # the next epoch: same part
        assert not np.array_equal(labels[:20], labels[20:40])  # in a new order
        _assert_batches_equal(
            batches[7], next(datasets.pretrain_batches(data, start_step=7, **shard))
        )
    assert sorted(np.concatenate([epoch[0], epoch[1]])) == list(range(40))


def test_tfds_host_crop_resume(tiny_tfds):
    data = tiny_tfds.copy_and_resolve_references()
    data.host_crop = True
    kwargs = dict(global_batch_size=4, image_size=6, seed=1)
    batches = _take(datasets.pretrain_batches(data, **kwargs), 12)  # past the first epoch
    assert batches[0]["views"].shape == (2, 4, 6, 6, 3)
    _assert_batches_equal(
        batches[11], next(datasets.pretrain_batches(data, start_step=11, **kwargs))
    )


def test_tfds_eval_parts_and_info(tiny_tfds):
    data = tiny_tfds
    info = datasets.dataset_info(data)
    assert info["num_examples"] == {"train": 40, "test": 12, "unlabelled": 8}
    assert info["num_classes"] == 40 and info["image_shape"] == (8, 8, 3)
    seen = []
    for p in range(3):  # 12 examples: 4 per process, batches of 3 -> 2 each
        batches = list(
            datasets.eval_batches(
                data, split="test", batch_size=3, image_size=8, process_index=p, process_count=3
            )
        )
        assert [b["mask"].sum() for b in batches] == [3, 1]
        for b in batches:
            assert (b["images"][b["mask"]] == b["labels"][b["mask"]][:, None, None, None]).all()
            seen += list(b["labels"][b["mask"]])
    assert sorted(seen) == list(range(12))


def test_tfds_mock_imagenet_cifar_stl10(tmp_path):
    import tensorflow_datasets as tfds

    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    (manual / "ILSVRC2012_img_train.tar").touch()  # mocked data; the manual-download check passes
    imagenet = _config(source="tfds", name="imagenet2012", data_dir=str(tmp_path), host_crop=True,
                       shuffle_buffer=4, shuffle_chunks=2, eval_split="validation")  # fmt: skip
    with tfds.testing.mock_data(num_examples=6):
        batch = next(
            datasets.pretrain_batches(imagenet, global_batch_size=4, image_size=24, seed=0)
        )
        assert batch["views"].shape == (2, 4, 24, 24, 3) and batch["views"].dtype == np.uint8
        assert batch["labels"].dtype == np.int32 and (batch["labels"] < 1000).all()
        assert not np.array_equal(batch["views"][0], batch["views"][1])
        assert datasets.dataset_info(imagenet)["num_classes"] == 1000
        evals = datasets.eval_batches(imagenet, split="validation", batch_size=4, image_size=24)
        evals = list(evals)
        assert [b["mask"].sum() for b in evals] == [4, 2] and evals[0]["file_names"].shape == (4,)
        cifar = _config(source="tfds", name="cifar10", shuffle_buffer=4)
        batch = next(datasets.pretrain_batches(cifar, global_batch_size=4, image_size=32, seed=0))
        assert batch["images"].shape == (4, 32, 32, 3) and batch["labels"].dtype == np.int32
        stl10 = _config(source="tfds", name="stl10", train_split="train+unlabelled", shuffle_buffer=4)  # fmt: skip
        batch = next(datasets.pretrain_batches(stl10, global_batch_size=2, image_size=96, seed=0))
        assert batch["images"].shape == (2, 96, 96, 3)
        assert datasets.require_labels(stl10, "train") == 10


def test_tfds_unlabelled_rows_are_minus_one_and_such_splits_are_unlabelled(tiny_tfds):
    data = tiny_tfds.copy_and_resolve_references()
    data.train_split = "train+unlabelled"
    batch = next(datasets.pretrain_batches(data, global_batch_size=48, image_size=8, seed=0))
    assert sorted(batch["labels"].tolist()) == [-1] * 8 + list(range(40))
    assert datasets.split_has_labels(data, "train+unlabelled")
    assert not datasets.split_has_labels(data, "unlabelled")
    with pytest.raises(ValueError, match="split 'unlabelled' of tfds dataset 'tiny_images' has no"):
        datasets.require_labels(data, "unlabelled")
    assert datasets.require_labels(data, "test") == 40


def test_tfds_errors(tmp_path, tiny_tfds):
    with pytest.raises(ValueError, match="unknown TFDS dataset"):
        datasets.dataset_info(_config(source="tfds", name="no_such_dataset_xyz"))
    imagenet = _config(source="tfds", name="imagenet2012", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=str(tmp_path / "downloads" / "manual")):
        next(datasets.pretrain_batches(imagenet, global_batch_size=2, image_size=8, seed=0))
    with pytest.raises(ValueError, match="is not an image feature"):
        datasets.dataset_info(_config(**{**tiny_tfds.to_dict(), "image_key": "picture"}))
    with pytest.raises(ValueError, match="cannot read split 'nope'"):
        list(datasets.eval_batches(tiny_tfds, split="nope", batch_size=2, image_size=8))


def test_argument_errors():
    data = _config(source="digits")
    with pytest.raises(ValueError, match="not divisible by the number of processes"):
        datasets.pretrain_batches(data, global_batch_size=6, image_size=8, seed=0, process_count=4)
    with pytest.raises(ValueError, match="not one of"):
        datasets.dataset_info(_config(source="imagenet"))
    with pytest.raises(TypeError, match="needs arrays"):
        datasets.pretrain_batches(
            _config(source="arrays"), global_batch_size=2, image_size=8, seed=0
        )
    with pytest.raises(ValueError, match="split 'valid' is not in"):
        datasets.eval_batches(data, split="valid", batch_size=2, image_size=8)
    with pytest.raises(ValueError, match="resize_method"):
        datasets.check_data_config(_config(resize_method="nearest"))
