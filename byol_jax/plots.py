"""Pictures of a BYOL representation, saved as PNG (matplotlib's Agg canvas, no display):

* ``plot_retrieval``: query images, each with its k nearest training images by cosine
  similarity of the representation, labels in the titles (``nearest_neighbours`` finds them);
* ``plot_embedding_map``: a 2-D map of representations coloured by label, PCA (fast,
  deterministic) or t-SNE (both scikit-learn);
* ``plot_curves`` / ``plot_training_curves``: loss, online-probe and kNN top-1 against step,
  from a run's ``metrics.jsonl``;
* ``save_pictures``: all of them for a trained learner (what ``python -m byol_jax.pictures``
  writes).

Figures are drawn on ``matplotlib.figure.Figure`` with an Agg canvas, never through pyplot:
no global backend is changed and no window opens.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

log = logging.getLogger("byol_jax")

PICTURES = ("retrieval", "map", "curves")
FILE_NAMES = {
    "retrieval": "retrieval.png",
    "map": "embedding_map.png",
    "curves": "training_curves.png",
}
_UNLABELLED_COLOUR = "0.6"


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | None) -> None:
    if path is not None:
        directory = os.path.dirname(os.fspath(path))
        if directory:
            os.makedirs(directory, exist_ok=True)
        figure.savefig(path, format="png")


def _name(label: int, class_names: Sequence[str] | None) -> str:
    if label < 0:
        return "unlabelled"
    return class_names[label] if class_names is not None else str(int(label))


# ---------------------------------------------------------------------------- retrieval


def nearest_neighbours(
    bank: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k most cosine-similar bank rows of each query: (indices int [M, k],
    similarities float32 [M, k]), most similar first. bank [N, D], queries [M, D]."""
    if not 1 <= k <= len(bank):
        raise ValueError(f"k must be in [1, {len(bank)}] (the bank's size), got {k}.")
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    similarity = unit(np.asarray(queries, np.float32)) @ unit(np.asarray(bank, np.float32)).T
    order = np.argsort(-similarity, axis=-1, kind="stable")[:, :k]
    return order, np.take_along_axis(similarity, order, axis=-1)


def _show(axis, image: np.ndarray, title: str, colour: str = "black") -> None:
    image = np.asarray(image)
    axis.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray")
    axis.set_title(title, fontsize=8, color=colour)
    axis.set_xticks([])
    axis.set_yticks([])


def plot_retrieval(
    query_images: np.ndarray,
    query_labels: np.ndarray,
    bank_images: np.ndarray,
    bank_labels: np.ndarray,
    neighbours: np.ndarray,
    similarities: np.ndarray,
    *,
    class_names: Sequence[str] | None = None,
    path: str | None = None,
) -> Figure:
    """A grid: one row per query (query_images uint8 [M, H, W, C]) followed by its k
    neighbours (indices [M, k] into bank_images [N, H, W, C], from ``nearest_neighbours``).
    A neighbour's title is its label and similarity, green when the label matches the
    query's. Saved as PNG to ``path`` when given."""
    num_queries, k = np.shape(neighbours)
    figure = _figure(1.3 * (k + 1), 1.45 * num_queries)
    axes = figure.subplots(num_queries, k + 1, squeeze=False)
    for row in range(num_queries):
        query_label = int(query_labels[row])
        _show(axes[row, 0], query_images[row], f"query: {_name(query_label, class_names)}")
        for col in range(k):
            index = int(neighbours[row, col])
            label = int(bank_labels[index])
            colour = "green" if label == query_label and label >= 0 else "red"
            title = f"{_name(label, class_names)}\ncos {similarities[row, col]:.3f}"
            _show(axes[row, col + 1], bank_images[index], title, colour)
    figure.suptitle(
        f"{k} nearest training images\n(cosine similarity of representations)", fontsize=9
    )
    _save(figure, path)
    return figure


# ---------------------------------------------------------------------------- embedding map


def project_2d(features: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """features [N, D] -> float32 [N, 2] by scikit-learn's PCA or t-SNE (init 'pca')."""
    features = np.asarray(features, np.float32)
    if len(features) < 3:
        raise ValueError(f"a 2-D map needs at least 3 points, got {len(features)}.")
    if method == "pca":
        from sklearn.decomposition import PCA  # noqa: PLC0415

        return PCA(n_components=2, random_state=seed).fit_transform(features).astype(np.float32)
    if method == "tsne":
        from sklearn.manifold import TSNE  # noqa: PLC0415

        perplexity = min(30.0, (len(features) - 1) / 3)
        tsne = TSNE(2, perplexity=perplexity, init="pca", random_state=seed)
        return tsne.fit_transform(features).astype(np.float32)
    raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}.")


def plot_embedding_map(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    method: str = "pca",
    class_names: Sequence[str] | None = None,
    max_points: int = 5000,
    seed: int = 0,
    path: str | None = None,
) -> Figure:
    """features [N, D] mapped to 2-D (``project_2d``), one colour per label (grey:
    unlabelled). At most ``max_points`` rows, drawn at random with ``seed``."""
    features, labels = np.asarray(features), np.asarray(labels)
    if len(features) > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(len(features), max_points, False))
        features, labels = features[rows], labels[rows]
    points = project_2d(features, method, seed)
    figure = _figure(6.5, 5.5)
    axis = figure.subplots()
    classes = [int(c) for c in np.unique(labels)]
    colours = _class_colours(max(classes) + 1 if classes and max(classes) >= 0 else 1)
    for label in classes:
        at = labels == label
        colour = _UNLABELLED_COLOUR if label < 0 else colours[label]
        axis.scatter(*points[at].T, s=6, color=colour, label=_name(label, class_names))
    if len(classes) <= 20:
        axis.legend(fontsize=7, markerscale=2, loc="best", frameon=False)
    name = {"pca": "PCA", "tsne": "t-SNE"}[method]
    axis.set_title(f"{name} of {len(features)} representations, coloured by label")
    axis.set_xticks([])
    axis.set_yticks([])
    _save(figure, path)
    return figure


def _class_colours(num_classes: int):
    from matplotlib import colormaps  # noqa: PLC0415

    name = "tab10" if num_classes <= 10 else "tab20" if num_classes <= 20 else "turbo"
    cmap = colormaps[name]
    if name == "turbo":
        return [cmap(i / max(num_classes - 1, 1)) for i in range(num_classes)]
    return [cmap(i) for i in range(num_classes)]


# ---------------------------------------------------------------------------- curves

_ACCURACIES = (
    ("probe_top1", "online probe top-1", "-"),
    ("knn_top1", "kNN top-1", "o-"),
    ("knn_random_init_top1", "kNN top-1, random init", "x"),
)


def plot_curves(rows: Sequence[dict], path: str | None = None) -> Figure | None:
    """Loss and (when present) probe / kNN top-1 against step, from metric rows
    ({'step', 'loss', 'probe_top1', 'knn_top1', ...}, as in metrics.jsonl). None when no
    row has a loss."""
    loss = [(r["step"], r["loss"]) for r in rows if "step" in r and "loss" in r]
    if not loss:
        return None
    accuracies = {
        key: [(r["step"], r[key]) for r in rows if "step" in r and key in r]
        for key, _, _ in _ACCURACIES
    }
    accuracies = {key: points for key, points in accuracies.items() if points}
    panels = 2 if accuracies else 1
    figure = _figure(5.0 * panels, 3.6)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    steps, values = np.asarray(loss, np.float64).T
    axes[0].plot(steps, values, color="tab:blue")
    axes[0].set(xlabel="step", ylabel="BYOL loss", title="loss")
    axes[0].grid(alpha=0.3)
    for key, label, style in _ACCURACIES:
        if key in accuracies:
            steps, values = np.asarray(accuracies[key], np.float64).T
            axes[1].plot(steps, 100 * values, style, label=label)
    if accuracies:
        axes[1].set(xlabel="step", ylabel="top-1 (%)", title="accuracy")
        axes[1].grid(alpha=0.3)
        axes[1].legend(fontsize=8, frameon=False, loc="lower right")
    _save(figure, path)
    return figure


def plot_training_curves(workdir: str, path: str | None = None) -> str | None:
    """Writes the training curves of a run (``workdir/metrics.jsonl``) to ``path`` (default
    ``workdir/training_curves.png``) and returns it; None, writing nothing, when there are
    no metrics or on any process but 0. Never raises: the training run calls it last."""
    try:
        import jax  # noqa: PLC0415

        from byol_jax import monitor  # noqa: PLC0415

        if jax.process_index() != 0:
            return None
        path = path or os.path.join(workdir, FILE_NAMES["curves"])
        figure = plot_curves(monitor.read_metrics(workdir), path)
        return None if figure is None else path
    except Exception as error:  # a plot must never fail the training run that asked for it
        log.warning("could not plot the training curves of %s: %s", workdir, error)
        return None


# ---------------------------------------------------------------------------- program


def save_pictures(
    learner,
    state,
    data,
    out_dir: str,
    *,
    workdir: str | None = None,
    split: str | None = None,
    pictures: Sequence[str] = PICTURES,
    method: str = "pca",
    num_queries: int = 6,
    k: int = 5,
    bank_size: int = 10_000,
    map_points: int = 2_000,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, str]:
    """Draws ``pictures`` of a trained learner and writes them as PNG to ``out_dir``:
    {picture: path}. The bank is the first ``bank_size`` examples of ``data.train_split``,
    the queries are drawn at random from ``split`` (default ``data.eval_split``)."""
    from byol_jax import data as datasets  # noqa: PLC0415
    from byol_jax import features  # noqa: PLC0415

    unknown = set(pictures) - set(PICTURES)
    if unknown:
        raise ValueError(f"unknown pictures {sorted(unknown)}: choose from {PICTURES}.")
    paths = {name: os.path.join(out_dir, FILE_NAMES[name]) for name in PICTURES}
    written = {}
    if "retrieval" in pictures or "map" in pictures:
        class_names = datasets.dataset_info(data).get("class_names")
        embed = lambda split, limit: features.embed_dataset(  # noqa: E731
            learner, state, data, split, limit=limit, batch_size=batch_size, keep_images=True
        )
        queries = embed(split or data.eval_split, map_points)
        if "retrieval" in pictures:
            bank = embed(data.train_split, bank_size)
            _retrieval(bank, queries, num_queries, k, seed, class_names, paths["retrieval"])
            written["retrieval"] = paths["retrieval"]
        if "map" in pictures:
            plot_embedding_map(
                queries["representations"],
                queries["labels"],
                method=method,
                class_names=class_names,
                path=paths["map"],
            )
            written["map"] = paths["map"]
    if "curves" in pictures and workdir is not None:
        if plot_training_curves(workdir, paths["curves"]) is not None:
            written["curves"] = paths["curves"]
    return written


def _retrieval(bank, queries, num_queries, k, seed, class_names, path) -> None:
    """The retrieval grid of ``num_queries`` queries drawn at random with ``seed``."""
    count = min(num_queries, len(queries["labels"]))
    rows = np.sort(np.random.default_rng(seed).choice(len(queries["labels"]), count, False))
    index, similarity = nearest_neighbours(
        bank["representations"], queries["representations"][rows], k
    )
    plot_retrieval(
        queries["images"][rows],
        queries["labels"][rows],
        bank["images"],
        bank["labels"],
        index,
        similarity,
        class_names=class_names,
        path=path,
    )
