"""Source names -> Source classes. The built-in sources are named as 'module:Class' and
imported on first use, so building the 'arrays' or 'digits' source never imports TensorFlow.

Adding a source: one module with a `Source` subclass, and one line in `_BUILTIN` (or a call
of `register_source` in the user's own code).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

import ml_collections

from byol_jax.data.source import Source

_BUILTIN = {
    "tfds": "byol_jax.data.tfds_source:TfdsSource",
    "folder": "byol_jax.data.folder:FolderSource",
    "arrays": "byol_jax.data.arrays:ArraysSource",
    "digits": "byol_jax.data.digits:DigitsSource",
}
_sources: dict[str, type[Source] | str] = dict(_BUILTIN)
SOURCES = _sources.keys()  # a live view: registered names appear in it


def register_source(name: str, cls: type[Source], *, replace: bool = False) -> None:
    """Makes `data.source = name` read with `cls`, a subclass of `Source`.

    A name already registered to another class is refused unless `replace`.
    """
    if not (isinstance(cls, type) and issubclass(cls, Source)):
        raise TypeError(f"register_source({name!r}, ...) needs a Source subclass, got {cls!r}.")
    current = _sources.get(name)
    if current is not None and current is not cls and not replace:
        raise ValueError(
            f"data source {name!r} is already registered ({current}): pick another name, "
            "or pass replace=True to replace it."
        )
    _sources[name] = cls


def check_name(name: str) -> str:
    if name not in _sources:
        raise ValueError(f"data.source={name!r} is not one of {tuple(_sources)}.")
    return name


def source_class(name: str) -> type[Source]:
    """The class registered as `name`, importing a built-in one on first use."""
    cls = _sources[check_name(name)]
    if isinstance(cls, str):
        module, _, attribute = cls.partition(":")
        cls = _sources[name] = getattr(importlib.import_module(module), attribute)
    return cls


def build(data: ml_collections.ConfigDict, arrays: Mapping | None = None) -> Source:
    """The source `data.source` names, built from `data` (and `arrays`)."""
    return source_class(data.source)(data, arrays)
