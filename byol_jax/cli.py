"""What the entry points that read a trained run share: the flags naming the run and the data
(``--workdir``, ``--split``, ``--folder``, ``--data.*``, ...), loading them, and turning a
user's mistake into a one-line message rather than a traceback."""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from byol_jax import checkpoint
from byol_jax import data as datasets

# What a wrong --workdir, --split or --data.* raises: a message, not a traceback.
USER_ERRORS = (checkpoint.CheckpointError, ValueError, TypeError, app.UsageError)


def define_source_flags() -> dict:
    """--workdir and --pretrained: where the trained weights are (one of them)."""
    return {
        "workdir": flags.DEFINE_string("workdir", None, "The workdir of a byol_jax.train run."),
        "pretrained": flags.DEFINE_string(
            "pretrained",
            None,
            "Instead of --workdir: 'official:PATH' (the authors' checkpoint), "
            "'torchvision:PATH' (.safetensors or .pth) or 'workdir:PATH'.",
        ),
    }


def source(source_flags: dict) -> str:
    """The one source the flags name (pretrained.parse's spelling)."""
    workdir, pretrained = source_flags["workdir"].value, source_flags["pretrained"].value
    if bool(workdir) == bool(pretrained):
        raise app.UsageError("give one of --workdir and --pretrained.")
    return pretrained or workdir


def define_run_flags(out_help: str) -> dict:
    """Defines the shared flags (call it once, at an entry point's import) -> {name: holder}."""
    return {
        **define_source_flags(),
        "out": flags.DEFINE_string("out", None, out_help),
        "split": flags.DEFINE_string("split", None, "Split to read (default: data.eval_split)."),
        "folder": flags.DEFINE_string(
            "folder", None, "A folder of images to read instead of the run's data."
        ),
        "batch_size": flags.DEFINE_integer("batch_size", 256, "Images per embedding call."),
        "use_target": flags.DEFINE_bool(
            "use_target", False, "Embed with the target network instead of the online one."
        ),
        "data": config_flags.DEFINE_config_dict(
            "data", datasets.default_data_config(), "Overrides of the run's config.data."
        ),
    }


def load_run(run_flags: dict):
    """(learner, state, run config, data config) that the shared flags name."""
    from byol_jax import features, pretrained  # noqa: PLC0415 (after flags: JAX reads its own)

    where = source(run_flags)
    config, _ = pretrained.load_config(where)  # fails early, naming how to train
    learner, state = pretrained.load(where)
    overrides = config_flags.get_override_values(flags.FLAGS[run_flags["data"].name])
    data = features.data_config_for(config.data, overrides, run_flags["folder"].value)
    return learner, state, config, data


def exit_with(program: str, error: BaseException) -> None:
    """Ends the program with ``byol_jax.<program>: <message>`` and status 1."""
    sys.exit(f"byol_jax.{program}: {error}")
