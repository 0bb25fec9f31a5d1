"""byol_jax against an independent BYOL (tests/reference.py) on the path the configs train.

The target differs from the online network (perturbed, or after real steps), BatchNorm runs
per view (the configs) or over both views at once (the seed), on one device and on 8 forced
devices with cross-replica BatchNorm. The loss, the online gradients, every BatchNorm
statistic of both networks and the EMA target must equal the reference to 1e-5; then five
steps of the trainer's own LARS, warm-up + cosine learning rate and cosine tau must follow
an independent loop.
"""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref

import byol_jax
from byol_jax import augment, networks, parallel
from byol_jax import data as datasets
from byol_jax.programs import pretraining

IDENTITY = lambda key, x: x
FLIP = lambda key, x: x[:, :, ::-1, :]
TOL = dict(rtol=1e-5, atol=1e-5)


def recording() -> optax.GradientTransformation:
    """An optimiser that leaves the parameters alone and keeps the gradient it was given as its
    state: the learner's exact (device-averaged) gradient, read from ``state.opt_state``."""
    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    return optax.GradientTransformation(
        zeros, lambda grads, state, params=None: (zeros(grads), grads)
    )


def _learner(shared, **kwargs):
    return byol_jax.BYOL(
        networks.tiny_resnet(),
        image_size=8,
        projection_size=8,
        projection_hidden_size=16,
        augment_fn=IDENTITY,
        augment_fn2=FLIP,
        moving_average_decay=0.9,
        views_in_one_batch=shared,
        **kwargs,
    )


def _images(n=16, seed=1):
    return jax.random.uniform(jax.random.key(seed), (n, 8, 8, 3))


def _drifted(state, seed=7):
    """The target moved away from the online network: every target parameter perturbed, and
    both networks' BatchNorm statistics different from each other and from their init."""
    leaves, treedef = jax.tree.flatten(state.target_params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + 0.3 * (jnp.std(x) + 0.05) * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]  # fmt: skip
    return state.replace(
        target_params=jax.tree.unflatten(treedef, noisy),
        online_batch_stats=jax.tree.map(lambda x: 1.2 * x + 0.05, state.online_batch_stats),
        target_batch_stats=jax.tree.map(lambda x: 1.5 * x + 0.1, state.target_batch_stats),
    )


def _trained(learner, images, steps=3):
    """A state after real LARS steps with the paper's views: the target is an EMA behind."""
    real = byol_jax.BYOL(
        learner.encoder,
        image_size=8,
        projection_size=8,
        projection_hidden_size=16,
        moving_average_decay=0.9,
        augment_fn=augment.recipe("byol_cifar", 8)[0],
    )
    tx = byol_jax.optim.create_optimizer("lars", 2.0, weight_decay=1e-4)
    state = real.init(jax.random.key(0), images, tx)
    step = jax.jit(real.train_step)
    for i in range(steps):
        state, _ = step(state, images, jax.random.key(100 + i))
    return state


def _state(learner, images, how):
    state = learner.init(jax.random.key(0), images, recording())
    if how == "perturbed":
        return _drifted(state)
    trained = _trained(learner, images)
    return trained.replace(tx=state.tx, opt_state=state.tx.init(trained.online_params))


def _step(learner, state, images, devices, labels=None):
    """One learner step on 1 device (jit) or mapped over 8 ('pmap' / 'shard_map')."""
    key = jax.random.key(3)
    if devices == "1":
        return jax.jit(learner.train_step)(state, images, key, labels)
    replicas = parallel.Replicas(devices, learner.axis_name)
    assert replicas.num_replicas == 8
    shard = replicas.shard
    new, metrics = replicas.map(learner.train_step, donate_state=False)(
        replicas.replicate(state),
        shard(np.asarray(images)),
        key,
        None if labels is None else shard(np.asarray(labels)),
    )
    return replicas.unreplicate(new), replicas.unreplicate(metrics)


def _close(ours, theirs, what, of_leaf_scale=0.0):
    """Leaf by leaf within TOL, or within ``of_leaf_scale`` times the leaf's largest value."""
    flat_ours = jax.tree_util.tree_leaves_with_path(ours)
    flat_theirs = jax.tree.leaves(theirs)
    assert len(flat_ours) == len(flat_theirs), what
    for (path, a), b in zip(flat_ours, flat_theirs, strict=True):
        atol = max(TOL["atol"], of_leaf_scale * float(np.max(np.abs(b), initial=0.0)))
        np.testing.assert_allclose(
            a, b, rtol=TOL["rtol"], atol=atol, err_msg=f"{what}{jax.tree_util.keystr(path)}"
        )


@pytest.mark.parametrize("devices", ["1", "shard_map", "pmap"])
@pytest.mark.parametrize("shared", [False, True], ids=["per_view_bn", "shared_bn"])
@pytest.mark.parametrize("how", ["perturbed", "trained"])
def test_step_matches_the_reference_when_the_target_differs(how, shared, devices):
    learner, images = _learner(shared), _images()
    state = _state(learner, images, how)
    view1, view2 = images, FLIP(None, images)
    (loss, (online_stats, target_stats, _)), grads = jax.value_and_grad(
        ref.byol_loss, has_aux=True
    )(
        state.online_params,
        state.target_params,
        state.online_batch_stats,
        state.target_batch_stats,
        view1,
        view2,
        shared,
    )
    new, metrics = _step(learner, state, images, devices)
    np.testing.assert_allclose(metrics["loss"], loss, **TOL)
    _close(new.opt_state, grads, "online gradient ")
    _close(new.online_batch_stats, online_stats, "online BatchNorm statistics ")
    _close(new.target_batch_stats, target_stats, "target BatchNorm statistics ")
    # The recording optimiser leaves the online network where it was; the target takes
    # (1 - tau) of the way to it.
    _close(new.target_params, ref.ema(state.target_params, state.online_params, 0.9), "target ")
    assert abs(float(loss) - float(_reference_loss(state, images, not shared))) > 1e-4, (
        "per-view and shared BatchNorm give the same loss here: the case cannot tell them apart"
    )


def _reference_loss(state, images, shared):
    args = (state.online_params, state.target_params, state.online_batch_stats)
    return ref.byol_loss(*args, state.target_batch_stats, images, FLIP(None, images), shared)[0]


def test_the_target_network_is_used_not_the_online_one():
    """With a drifted target, the loss that bootstraps from the online network's projection
    (a target taken from online under stop-gradient) is far from byol_jax's."""
    learner, images = _learner(False), _images()
    state = _state(learner, images, "perturbed")
    as_online = state.replace(
        target_params={k: state.online_params[k] for k in ("encoder", "projector")},
        target_batch_stats={k: state.online_batch_stats[k] for k in ("encoder", "projector")},
    )
    ours = float(_step(learner, state, images, "1")[1]["loss"])
    assert abs(ours - float(_reference_loss(state, images, False))) < 1e-5
    assert abs(ours - float(_reference_loss(as_online, images, False))) > 1e-3


@pytest.mark.parametrize("devices", ["1", "shard_map"])
def test_probe_metrics_are_the_accuracy_on_the_labelled_rows(devices):
    images = _images()
    labels = jnp.asarray([0, 1, 2, -1, 1, -1, 2, 0] * 2)  # 12 labelled rows of 16
    learner = _learner(False, num_classes=3)
    state = _drifted(learner.init(jax.random.key(0), images, recording()))
    probe = state.online_params["probe"]
    # A probe that gets some rows right and some wrong, so that top-1 is neither 0 nor 1.
    probe = {"kernel": jax.random.normal(jax.random.key(5), probe["kernel"].shape), "bias": probe["bias"]}  # fmt: skip
    state = state.replace(online_params={**state.online_params, "probe": probe})
    (loss, (_, _, sums)), grads = jax.value_and_grad(ref.byol_loss, has_aux=True)(
        state.online_params,
        state.target_params,
        state.online_batch_stats,
        state.target_batch_stats,
        images,
        FLIP(None, images),
        False,
        labels,
    )
    new, metrics = _step(learner, state, images, devices, labels)
    assert int(sums["count"]) == 12 and 0 < int(sums["correct"]) < 12
    assert float(metrics["probe_count"]) == 12
    np.testing.assert_allclose(metrics["probe_top1"], sums["correct"] / 12, rtol=1e-6)
    _close(new.opt_state, grads, "gradient with the probe ")


# ------------------------------------------------------------------------ a short trajectory


def _trainer_setup(tmp_path):
    """The trainer's own learner and optimiser: quickstart at tiny size, LARS with 2 warm-up
    steps then cosine decay, cosine tau, per-view BatchNorm, the online probe, 8 devices."""
    config = helpers.load_config(
        "quickstart",
        ("total_steps", 5),
        ("batch_size", 16),
        ("warmup_fraction", 0.4),
        ("optimizer", "lars"),
        ("base_learning_rate", 3.0),
        ("weight_decay", 1e-3),
        ("tau_schedule", "cosine"),
        ("base_tau", 0.9),
    )
    run = pretraining.setup(config, str(tmp_path))
    assert not run.learner.views_in_one_batch and run.learner.num_classes == 10
    return config, run


def _views(learner, images, key, devices):
    """The views the mapped step draws: the step key split in two, folded with the device index
    on each device's contiguous part of the batch (the contract of BYOL.train_step)."""
    key1, key2 = jax.random.split(key)
    parts = np.split(np.asarray(images), devices)
    view = jax.jit(lambda fn, k, x: fn(k, x), static_argnums=0)
    v1 = [view(learner.augment_fn, jax.random.fold_in(key1, d), x) for d, x in enumerate(parts)]
    v2 = [view(learner.augment_fn2, jax.random.fold_in(key2, d), x) for d, x in enumerate(parts)]
    return jnp.concatenate(v1), jnp.concatenate(v2)


def _reference_step(k, ours, batch, learner, step_key, peak):
    """Step k of the independent loop, from byol_jax's state before it: the views, the loss
    and its gradient, LARS (its momentum read from that state), the EMA at the step's tau."""
    view1, view2 = _views(learner, batch["images"], jax.random.fold_in(step_key, k), 8)
    (_, (online_stats, target_stats, _)), grads = jax.value_and_grad(ref.byol_loss, has_aux=True)(
        ours.online_params,
        ours.target_params,
        ours.online_batch_stats,
        ours.target_batch_stats,
        view1,
        view2,
        False,
        batch["labels"],
    )
    trace = optax.tree_utils.tree_get(ours.opt_state, "trace")
    lr = ref.warmup_cosine(k, peak, warmup=2, total=5)
    params, trace = ref.lars(ours.online_params, grads, trace, lr, weight_decay=1e-3)
    target = ref.ema(ours.target_params, params, ref.cosine_tau(k, 0.9, total=5))
    return params, target, online_stats, target_stats, trace, lr


def test_five_trainer_steps_follow_an_independent_loop(tmp_path):
    """Each of five steps of the trainer's mapped step equals the independent loop's step from
    the same state. (Each step starts from byol_jax's state: run free, the two trajectories
    part by more than float32 round-off once a ReLU input crosses zero in one and not the
    other, measured 7e-5 in the momentum by step 4.)"""
    config, run = _trainer_setup(tmp_path)
    learner, replicas = run.learner, run.replicas
    init_key, step_key = jax.random.split(jax.random.key(config.seed))
    state = learner.init(init_key, np.zeros((2, 16, 16, 3), np.uint8), run.tx)
    batches = datasets.pretrain_batches(
        config.data, global_batch_size=16, image_size=16, seed=config.seed
    )
    step = replicas.map(learner.train_step, donate_state=False)
    rstate, peak = replicas.replicate(state), 3.0 * 16 / 256
    for k in range(5):
        batch = next(batches)
        before = replicas.unreplicate(rstate)
        images, labels = replicas.shard(batch["images"]), replicas.shard(batch["labels"])
        rstate, metrics = step(rstate, images, jax.random.fold_in(step_key, k), labels)
        ours = replicas.unreplicate(rstate)
        params, target, online_stats, target_stats, trace, lr = _reference_step(
            k, before, batch, learner, step_key, peak
        )
        _close(ours.online_params, params, f"step {k}: online ")
        _close(ours.target_params, target, f"step {k}: target ")
        _close(ours.online_batch_stats, online_stats, f"step {k}: online BatchNorm statistics ")
        _close(ours.target_batch_stats, target_stats, f"step {k}: target BatchNorm statistics ")
        # The momentum holds batch sums of gradient terms that cancel: reordered float32 sums
        # (XLA's kernels differ by CPU) left up to 7.7e-5 there, 8e-4 of the leaf's largest
        # value, on an avx512_fp16 CPU. Momentum of the wrong scale is off by far more.
        momentum = optax.tree_utils.tree_get(ours.opt_state, "trace")
        _close(momentum, trace, f"step {k}: momentum ", of_leaf_scale=2e-3)
        np.testing.assert_allclose(replicas.unreplicate(metrics)["learning_rate"], lr, rtol=1e-6)
        assert int(ours.opt_state.count) == k + 1
    assert int(ours.step) == 5 and lr == pytest.approx(peak * 0.5 * (1 + np.cos(np.pi * 2 / 3)))


def test_views_in_one_batch_defaults_to_the_papers_per_view_batches():
    assert byol_jax.BYOL(networks.tiny_resnet(), image_size=8).views_in_one_batch is False
    assert helpers.load_config("cifar10").views_in_one_batch is False
