"""A trained BYOL model from its workdir, in two lines:

    learner, state = byol_jax.pretrained.load("workdirs/cifar10")
    features = learner.embed(state, images)          # images: uint8 [N, H, W, 3]

The workdir's config.json rebuilds the learner (no data is read) through the same builders
as the trainer; its newest good checkpoint gives the state.
"""

from __future__ import annotations

import os

import jax
import ml_collections

from byol_jax import builders, byol, checkpoint, lifecycle


def load_config(workdir: str) -> tuple[ml_collections.ConfigDict, dict]:
    """(the run's config, the facts setup derived: total_steps, steps_per_epoch, num_classes)."""
    return lifecycle.load_run_config(workdir)


def load(workdir: str) -> tuple[byol.BYOL, byol.ByolState]:
    """The learner and the newest readable state of a training run's workdir."""
    config, facts = load_config(workdir)
    learner = builders.build_learner(config, facts["total_steps"], facts["num_classes"])
    tx = builders.build_optimizer(config, facts["total_steps"], facts["steps_per_epoch"])
    template = jax.device_get(learner.init(jax.random.key(0), builders.sample_images(config), tx))
    state, _ = checkpoint.load_latest(
        os.path.join(workdir, "checkpoints"), template, workdir=workdir
    )
    return learner, state
