"""A trained BYOL model in two lines, from wherever its weights are:

    learner, state = byol_jax.pretrained.load("workdirs/cifar10")              # a byol_jax run
    learner, state = byol_jax.pretrained.load("official:pretrain_res50x1.pkl")  # the authors'
    learner, state = byol_jax.pretrained.load("torchvision:resnet50.safetensors")
    features = learner.embed(state, images)          # images: uint8 [N, H, W, 3]

One spelling names a source everywhere (``--config.pretrained=...`` of training and linear
evaluation, ``--pretrained`` of embed, pictures and export): a workdir (plain, or
``workdir:PATH``), ``official:PATH`` (docs/weights.md) or ``torchvision:PATH``.

A workdir's config.json rebuilds the learner (no data is read) through the trainer's own
builders and its newest good checkpoint gives the state. Imported weights get the learner of
the paper's ImageNet recipe for their architecture (configs/imagenet.py's settings; the
authors' 'same' padding for theirs). A run of your own encoder (Linen or NNX, trained from
Python and saved with ``byol_jax.checkpoint.Checkpointer`` under ``workdir/checkpoints``)
loads with the learner and optimiser it was trained with: ``load(workdir, learner=, tx=)``.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from byol_jax import builders, byol, checkpoint, default_config, lifecycle
from byol_jax.weights import official, torchvision

log = logging.getLogger("byol_jax")
KINDS = ("workdir", "official", "torchvision")
_IMAGENET_STEPS_PER_EPOCH = 1_281_167 // 4096  # the schedules of configs/imagenet.py


class PretrainedError(ValueError):
    """Weights that cannot be loaded as asked (a wrong source, an architecture mismatch)."""


def parse(source: str) -> tuple[str, str]:
    """'official:PATH' -> ('official', PATH); a plain path is a workdir."""
    kind, sep, path = str(source).partition(":")
    if sep and kind in KINDS:
        return kind, path
    return "workdir", str(source)


def load_config(source: str) -> tuple[ml_collections.ConfigDict, dict]:
    """(the config that rebuilds the learner, the facts: total_steps, steps_per_epoch,
    num_classes): a workdir's own, or the recipe's for imported weights."""
    kind, path = parse(source)
    if kind == "workdir":
        return lifecycle.load_run_config(path)
    return _imported(kind, path)[0]


def load(
    source: str,
    *,
    learner: byol.BYOL | None = None,
    tx: optax.GradientTransformation | None = None,
) -> tuple[byol.BYOL, byol.ByolState]:
    """The learner and state of ``source``. With ``learner`` (and the ``tx`` it trained with,
    whose state the checkpoint holds), a workdir's state is restored onto that learner's
    structure and config.json is not read."""
    kind, path = parse(source)
    if kind != "workdir":
        (config, facts), parts = _imported(kind, path)
        learner, tx = _build(config, facts)
        sample = builders.sample_images(config)
        # Shapes only: the file holds the encoder (initialising a ResNet-50 eagerly took 13 s).
        template = jax.eval_shape(lambda key: learner.init(key, sample, tx), jax.random.key(0))
        return learner, place(template, _with_fresh_heads(learner, template, parts), where=source)
    if learner is None:
        config, facts = lifecycle.load_run_config(path)
        learner, tx = _build(config, facts)
        sample = builders.sample_images(config)
    else:
        size = learner.image_size
        sample = np.zeros((2, size, size, learner.channels), np.uint8)
    template = jax.device_get(learner.init(jax.random.key(0), sample, tx or optax.identity()))
    state, _ = checkpoint.load_latest(os.path.join(path, "checkpoints"), template, workdir=path)
    return learner, state


def weights(source: str) -> dict:
    """The arrays of ``source`` that ``place`` puts into a learner's state: {'online_params',
    'online_batch_stats'[, 'target_params', 'target_batch_stats', 'step']}."""
    kind, path = parse(source)
    if kind != "workdir":
        return _imported(kind, path)[1]
    _, state = load(path)
    fields = ("online_params", "online_batch_stats", "target_params", "target_batch_stats")
    return {f: getattr(state, f) for f in fields if getattr(state, f) is not None}


def _with_fresh_heads(learner, template, parts: dict) -> dict:
    """``parts`` with a fresh projector / predictor / probe where the file has none (a
    torchvision file holds the encoder and maybe the classifier only)."""
    online = parts["online_params"]
    if all(k in online for k in template.online_params):
        return parts
    size = template.online_params["projector"]["Dense_0"]["kernel"].shape[0]
    heads, head_stats = learner.init_heads(jax.random.key(0), size)
    log.info("The file has no %s: they start fresh.", sorted(set(heads) - set(online)))
    return {
        **parts,
        "online_params": {**heads, **online},
        "online_batch_stats": {**head_stats, **parts["online_batch_stats"]},
    }


def _build(config, facts):
    learner = builders.build_learner(config, facts["total_steps"], facts["num_classes"])
    return learner, builders.build_optimizer(config, facts["total_steps"], facts["steps_per_epoch"])


def _imported(kind: str, path: str):
    """((config, facts), parts) for imported weights; parts: {'online_params', ...}."""
    if kind == "official":
        raw = official.read(path)
        arch = official.architecture(raw["online_params"])
        online, online_stats = official.to_byol_jax(raw["online_params"], raw["online_state"])
        target, target_stats = official.to_byol_jax(raw["target_params"], raw["target_state"])
        parts = {
            "online_params": online,
            "online_batch_stats": online_stats,
            "target_params": {k: target[k] for k in ("encoder", "projector")},
            "target_batch_stats": {k: target_stats[k] for k in ("encoder", "projector")},
            "step": raw["step"],
        }
        config = _recipe_config(arch.encoder_fields(), "same", arch.num_classes)
        config.projection_hidden_size = arch.projection_hidden_size
        config.projection_size = arch.projection_size
        return (config, _facts(arch.num_classes)), parts
    state = torchvision.read(path)
    depth = torchvision.depth_of(state)
    params, stats, head = torchvision.to_byol_jax(state)
    num_classes = None if head is None else int(np.shape(head["bias"])[0])
    parts = {"online_params": {"encoder": params}, "online_batch_stats": {"encoder": stats}}
    if head is not None:
        parts["online_params"]["probe"] = head
    config = _recipe_config({"encoder": f"resnet{depth}"}, "symmetric", num_classes)
    return (config, _facts(num_classes)), parts


def _recipe_config(encoder: dict, padding, num_classes) -> ml_collections.ConfigDict:
    """configs/imagenet.py's learner for an imported ResNet (the data is the user's to set)."""
    config = default_config.get_config()
    config.update(encoder)
    config.padding = padding
    config.image_size, config.online_probe = 224, num_classes is not None
    config.data.host_crop = True
    return config


def _facts(num_classes) -> dict:
    steps = 1000 * _IMAGENET_STEPS_PER_EPOCH
    return {"total_steps": steps, "steps_per_epoch": _IMAGENET_STEPS_PER_EPOCH, "num_classes": num_classes}  # fmt: skip


def place(state: byol.ByolState, parts: dict, *, where: str) -> byol.ByolState:
    """``state`` with the imported ``parts`` in place, and a fresh optimiser state. Each
    network part ('encoder', 'projector', ...) must match the learner's shapes exactly: a
    mismatch is a PretrainedError naming the leaf. Parts the source lacks keep their fresh
    values; without a target in the source, the target starts as a copy of the online one."""
    new = {}
    for field in ("online_params", "online_batch_stats", "target_params", "target_batch_stats"):
        mine = getattr(state, field)
        if mine is None:
            continue
        theirs = parts.get(field)
        if theirs is None and field.startswith("target"):  # the target starts as the online
            online = new[field.replace("target", "online")]
            theirs = {k: online[k] for k in mine}
        new[field] = {k: _matched(mine[k], (theirs or {}).get(k), f"{field}/{k}", where) for k in mine}  # fmt: skip
    missing = [k for k in state.online_params if k not in parts["online_params"]]
    if missing:
        log.info("%s has no %s: they keep their fresh initial values.", where, missing)
    opt_state = state.tx.init(new["online_params"])
    return state.replace(
        **new, opt_state=opt_state, step=jnp.asarray(parts.get("step", 0), jnp.int32)
    )


def _matched(mine, theirs, what: str, where: str):
    """``theirs`` as arrays shaped like ``mine`` (None: keep mine); a mismatch names a leaf."""
    if theirs is None:
        return mine
    mine_flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mine)}
    theirs_flat = {
        jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(theirs)
    }
    for name in sorted(set(mine_flat) | set(theirs_flat)):
        if name not in theirs_flat or name not in mine_flat:
            side = "lacks" if name not in theirs_flat else "has, but the learner lacks,"
            raise PretrainedError(f"{where} {side} {what}{name}: it is not this architecture.")
        if np.shape(theirs_flat[name]) != np.shape(mine_flat[name]):
            raise PretrainedError(
                f"{what}{name} is {np.shape(theirs_flat[name])} in {where} but "
                f"{np.shape(mine_flat[name])} in the learner: a different width or depth "
                "(check encoder, width_multiplier and projection sizes)."
            )
    return jax.tree.map(lambda m, t: jnp.asarray(t, m.dtype), mine, theirs)
