"""The weighted kNN classifier that scores a representation during and after pre-training.

kNN as lightly and solo-learn monitor BYOL: cosine similarity to a bank of training
features, the k nearest vote for their class with weight exp(similarity / temperature).
It runs on the device in batches of queries, so a bank of 50,000 x 2048 features fits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("num_classes", "k"))
def _knn_votes(queries, bank, bank_labels, *, num_classes, k, temperature):
    similarity = queries @ bank.T  # [b, N] cosine similarities (rows are unit vectors)
    top_sim, top_index = jax.lax.top_k(similarity, k)
    weights = jnp.exp(top_sim / temperature)
    one_hot = jax.nn.one_hot(bank_labels[top_index], num_classes)  # [b, k, C]
    return jnp.einsum("bk,bkc->bc", weights, one_hot)


def knn_scores(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    batch_size: int = 256,
) -> np.ndarray:
    """Class scores [M, C] of test features [M, D] by weighted kNN over a bank [N, D]."""
    if len(train_features) != len(train_labels):
        raise ValueError(
            f"{len(train_features)} bank features but {len(train_labels)} labels: they must pair up."
        )
    if train_labels.min() < 0:
        raise ValueError("the kNN bank has unlabelled rows (label -1): use a labelled split.")
    k = min(k, len(train_features))
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    bank = jnp.asarray(unit(np.asarray(train_features, np.float32)))
    bank_labels = jnp.asarray(train_labels, jnp.int32)
    queries = unit(np.asarray(test_features, np.float32))
    scores = []
    for start in range(0, len(queries), batch_size):
        chunk = queries[start : start + batch_size]
        padded = np.zeros((batch_size, chunk.shape[1]), np.float32)  # one compiled shape
        padded[: len(chunk)] = chunk
        votes = _knn_votes(
            jnp.asarray(padded),
            bank,
            bank_labels,
            num_classes=num_classes,
            k=k,
            temperature=temperature,
        )
        scores.append(np.asarray(votes)[: len(chunk)])
    return np.concatenate(scores)


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict[str, float]:
    """{'top1': ..., 'top5': ...} fractions of rows whose label is among the k best scores."""
    order = np.argsort(-scores, axis=-1)
    return {
        f"top{k}": float(np.mean(np.any(order[:, :k] == labels[:, None], axis=-1)))
        for k in ks
        if k <= scores.shape[1]
    }


def knn_accuracy(
    train_features, train_labels, test_features, test_labels, *, num_classes, k=200, temperature=0.1
) -> dict[str, float]:
    """Top-1 / top-5 accuracy of the weighted kNN classifier."""
    scores = knn_scores(
        train_features,
        train_labels,
        test_features,
        num_classes=num_classes,
        k=k,
        temperature=temperature,
    )
    return top_k_accuracy(scores, np.asarray(test_labels))
