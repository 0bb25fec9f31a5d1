"""Helpers for tests, tools and benchmarks that drive whole runs on a CPU: config files with
overrides, a tiny model, and the environment for training subprocesses."""

from __future__ import annotations

import importlib.util
import os
import pathlib

import ml_collections

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = {
    "encoder": "tiny",
    "projection_hidden_size": 32,
    "projection_size": 16,
    "progress_bar": False,
}
# The same, as train.py flags.
TINY_FLAGS = [f"--config.{k}={v}" for k, v in TINY.items()]


def load_config(name_or_path, *overrides, tiny: bool = True) -> ml_collections.ConfigDict:
    """``configs/<name>.py`` (or a path) with (dotted key, value) overrides applied, as
    ``--config.key=value`` would; ``tiny`` first shrinks the model to seconds-per-run size."""
    path = pathlib.Path(name_or_path)
    if path.suffix != ".py":
        path = REPO / "configs" / f"{name_or_path}.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, value in [*(TINY.items() if tiny else ()), *overrides]:
        *parents, last = key.split(".")
        target = config
        for part in parents:
            target = target[part]
        target[last] = value
    return config


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
