"""kNN evaluation and loading a trained workdir."""

import numpy as np
import pytest

from byol_jax import knn


def _clusters(n_per_class, num_classes, dim, spread, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim))
    labels = np.repeat(np.arange(num_classes), n_per_class)
    return centres[labels] + spread * rng.normal(size=(len(labels), dim)), labels


def test_knn_separates_clusters_perfectly():
    train, train_labels = _clusters(100, 5, 16, 0.05, 0)
    test, test_labels = _clusters(20, 5, 16, 0.05, 0)
    accuracy = knn.knn_accuracy(train, train_labels, test, test_labels, num_classes=5, k=20)
    assert accuracy == {"top1": 1.0, "top5": 1.0}


def test_knn_on_random_labels_is_near_chance():
    rng = np.random.default_rng(1)
    train, test = rng.normal(size=(2000, 32)), rng.normal(size=(1000, 32))
    accuracy = knn.knn_accuracy(
        train, rng.integers(0, 10, 2000), test, rng.integers(0, 10, 1000), num_classes=10, k=200
    )
    assert abs(accuracy["top1"] - 0.1) < 0.04  # 1000 queries: binomial sd ~0.01
    assert abs(accuracy["top5"] - 0.5) < 0.06


def test_knn_votes_match_a_direct_computation():
    rng = np.random.default_rng(2)
    bank, labels = rng.normal(size=(50, 8)), rng.integers(0, 4, 50)
    queries = rng.normal(size=(7, 8))
    scores = knn.knn_scores(
        bank, labels, queries, num_classes=4, k=5, temperature=0.1, batch_size=3
    )
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit(queries) @ unit(bank).T
    expected = np.zeros((7, 4))
    for i in range(7):
        for j in np.argsort(-sims[i])[:5]:
            expected[i, labels[j]] += np.exp(sims[i, j] / 0.1)
    np.testing.assert_allclose(scores, expected, rtol=1e-4)


def test_knn_refuses_unlabelled_banks():
    with pytest.raises(ValueError, match="unlabelled rows"):
        knn.knn_scores(np.ones((3, 2)), np.array([0, -1, 1]), np.ones((1, 2)), num_classes=2)
