"""A data source written outside byol_jax: one class, registered with one call, trains through
the pre-training program and evaluates through its kNN, with no byol_jax file changed."""

import itertools
import json

import helpers
import numpy as np

from byol_jax import data
from byol_jax.data import ordering
from byol_jax.programs import pretraining


class StripesSource(data.Source):
    """Synthetic labelled images: class c is a horizontal stripe at row band c, plus noise."""

    SIZES = {"train": 64, "test": 32}

    def _split(self, split):
        if split not in self.SIZES:
            raise ValueError(f"split {split!r} is not in {self.describe()}: {sorted(self.SIZES)}.")
        rng = np.random.default_rng(0 if split == "train" else 1)
        labels = np.arange(self.SIZES[split]) % 4
        images = rng.integers(0, 60, (len(labels), 16, 16, 3)).astype(np.uint8)
        for image, label in zip(images, labels, strict=True):
            image[4 * label : 4 * label + 4] = 255
        return images, labels.astype(np.int32)

    def describe(self):
        return "the stripes"

    def info(self):
        counts = {name: n for name, n in self.SIZES.items()}
        return data.info_dict(counts, 4, ["top", "upper", "lower", "bottom"], (16, 16, 3))

    def has_labels(self, split):
        self._split(split)
        return True

    def train_batches(self, mode, split, *, batch, image_size, seed, start_step, process_index, process_count):  # fmt: skip
        images, labels = self._split(split)
        assert mode == "plain" and image_size == 16

        def batches():
            for step in itertools.count(start_step):  # the ordering contract: (seed, step)
                positions = ordering.stream_positions(step, batch, process_index, process_count)
                rows = ordering.example_indices(seed, positions, len(labels))
                yield {"images": images[rows], "labels": labels[rows]}

        return batches()

    def eval_batches(self, split, *, batch_size, image_size, process_index, process_count):
        images, labels = self._split(split)
        rows = ordering.eval_rows(len(labels), process_index, process_count)
        parts = (rows[i : i + batch_size] for i in range(0, len(rows), batch_size))
        batches = ({"images": images[r], "labels": labels[r]} for r in parts)
        return data.EvalPart(batches, len(labels), False)


def test_a_source_defined_here_trains_through_the_program(tmp_path):
    data.register_source("stripes", StripesSource)
    assert "stripes" in data.SOURCES
    config = helpers.load_config(
        "quickstart",
        ("data.source", "stripes"),
        ("total_steps", 3),
        ("batch_size", 16),
        ("log_every", 1),
        ("checkpoint_every", 3),
        ("knn_k", 5),
        ("eval_batch_size", 16),
    )
    summary = pretraining.train_and_evaluate(config, str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all(r["probe_count"] == 16 for r in rows if "loss" in r)  # every stripe is labelled
    expected, queries = helpers.independent_knn(tmp_path, config)
    assert queries == 32 and abs(summary["knn_top1"] - expected) <= 1 / 32 + 1e-9
    batch = next(data.eval_batches(config.data, split="test", batch_size=16, image_size=16))
    assert batch["images"].shape == (16, 16, 16, 3) and batch["mask"].all()
