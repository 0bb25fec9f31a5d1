"""A trained BYOL model from its workdir, in two lines:

    learner, state = byol_jax.pretrained.load("workdirs/cifar10")
    features = learner.embed(state, images)          # images: uint8 [N, H, W, 3]

The workdir's config.json rebuilds the learner (no data is read); its newest good checkpoint
gives the state.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from byol_jax import byol, checkpoint, training


def load_config(workdir: str) -> tuple[ml_collections.ConfigDict, dict]:
    """(the run's config, the facts setup derived: total_steps, steps_per_epoch, num_classes)."""
    values = checkpoint.load_config(workdir)
    facts = values.pop(training.RUN_KEY, None)
    if facts is None:
        raise checkpoint.CheckpointError(
            f"{workdir}/config.json was not written by byol_jax.train: it has no "
            f"'{training.RUN_KEY}' record. Point to a workdir of a byol_jax training run."
        )
    return ml_collections.ConfigDict(values), facts


def load(workdir: str) -> tuple[byol.BYOL, byol.ByolState]:
    """The learner and the newest readable state of a training run's workdir."""
    config, facts = load_config(workdir)
    learner = training.build_learner(config, facts["total_steps"], facts["num_classes"])
    tx = training.build_optimizer(config, facts["total_steps"], facts["steps_per_epoch"])
    sample = np.zeros((2, config.image_size, config.image_size, 3), np.uint8)
    template = jax.device_get(learner.init(jax.random.key(0), sample, tx))
    state, _ = checkpoint.load_latest(
        os.path.join(workdir, "checkpoints"), template, workdir=workdir
    )
    return learner, state
