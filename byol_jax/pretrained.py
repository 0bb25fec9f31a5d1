"""A trained BYOL model from its workdir, in two lines:

    learner, state = byol_jax.pretrained.load("workdirs/cifar10")
    features = learner.embed(state, images)          # images: uint8 [N, H, W, 3]

The workdir's config.json rebuilds the learner (no data is read) through the same builders
as the trainer; its newest good checkpoint gives the state. A run of your own encoder (Linen
or NNX, trained from Python and saved with ``byol_jax.checkpoint.Checkpointer`` under
``workdir/checkpoints``) loads with the learner and optimiser it was trained with:
``load(workdir, learner=learner, tx=tx)``.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
import optax

from byol_jax import builders, byol, checkpoint, lifecycle


def load_config(workdir: str) -> tuple[ml_collections.ConfigDict, dict]:
    """(the run's config, the facts setup derived: total_steps, steps_per_epoch, num_classes)."""
    return lifecycle.load_run_config(workdir)


def load(
    workdir: str,
    *,
    learner: byol.BYOL | None = None,
    tx: optax.GradientTransformation | None = None,
) -> tuple[byol.BYOL, byol.ByolState]:
    """The learner and the newest readable state of a training run's workdir. With
    ``learner`` (and the ``tx`` it trained with, whose state the checkpoint holds), the state
    is restored onto that learner's structure and config.json is not read."""
    if learner is None:
        config, facts = load_config(workdir)
        learner = builders.build_learner(config, facts["total_steps"], facts["num_classes"])
        tx = builders.build_optimizer(config, facts["total_steps"], facts["steps_per_epoch"])
        sample = builders.sample_images(config)
    else:
        size = learner.image_size
        sample = np.zeros((2, size, size, learner.channels), np.uint8)
    template = jax.device_get(learner.init(jax.random.key(0), sample, tx or optax.identity()))
    state, _ = checkpoint.load_latest(
        os.path.join(workdir, "checkpoints"), template, workdir=workdir
    )
    return learner, state
