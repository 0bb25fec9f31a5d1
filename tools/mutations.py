"""Deliberate bugs, and the tests that must catch them.

    python tools/mutations.py            # every mutation; prints a table, exits 1 if one survives
    python tools/mutations.py --only ema_tau_swapped --keep

Each mutation replaces one piece of byol_jax's code (the text must occur exactly once) in a
scratch copy of the working tree, runs the named tests there (``-x``: the first failure is
enough), and counts as caught when they fail. A mutation the tests survive is a check that
cannot fail. This is how the trust issue's "which deliberate bug each new check catches" is
answered; it is a tool, not part of the test suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
SKIP = {".git", ".venv", ".venv-lowest", ".cache", "__pycache__", ".pytest_cache", ".ruff_cache"}


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


T = "tests/"
MUTATIONS = [
    Mutation("target_branch_from_online", "byol_jax/byol.py",
             "                state.target_params, state.target_batch_stats, view1, view2, False, bn_axis",
             "                jax.lax.stop_gradient(online_params), state.target_batch_stats, view1, view2, False, bn_axis",
             (T + "test_independent.py::test_the_target_network_is_used_not_the_online_one",)),
    Mutation("per_view_batchnorm_ignored", "byol_jax/byol.py",
             "        if self.views_in_one_batch:  # one BatchNorm batch of both views (the seed)",
             "        if True:",
             (T + "test_independent.py::test_step_matches_the_reference_when_the_target_differs",)),
    Mutation("second_view_statistics_dropped", "byol_jax/byol.py",
             "        out2, proj2, _, stats = self._forward(params, stats, view2, predict, bn_axis)",
             "        out2, proj2, _, _ = self._forward(params, stats, view2, predict, bn_axis)",
             (T + "test_independent.py::test_step_matches_the_reference_when_the_target_differs",)),
    Mutation("target_statistics_not_updated", "byol_jax/byol.py",
             "                target_batch_stats=target_stats,",
             "                target_batch_stats=state.target_batch_stats,",
             (T + "test_independent.py::test_step_matches_the_reference_when_the_target_differs",)),
    Mutation("ema_reads_online_before_the_update", "byol_jax/byol.py",
             "ema.target_update(online_params, state.target_params, tau)",
             "ema.target_update(state.online_params, state.target_params, tau)",
             (T + "test_independent.py::test_five_trainer_steps_follow_an_independent_loop",)),
    Mutation("ema_tau_swapped", "byol_jax/ema.py",
             "optax.incremental_update(online_part, target_params, 1.0 - tau)",
             "optax.incremental_update(online_part, target_params, tau)",
             (T + "test_seed_parity.py::test_ema_matches_seed",)),
    Mutation("probe_gradient_mean_of_replica_means", "byol_jax/losses.py",
             "    return replicas * loss_sum / jnp.maximum(total, 1.0), sums",
             "    return loss_sum / jnp.maximum(count, 1.0), sums",
             (T + "test_independent.py::test_probe_metrics_are_the_accuracy_on_the_labelled_rows",)),
    Mutation("weight_decay_on_biases", "byol_jax/optim.py",
             "    return jax.tree.map(lambda p: p.ndim > 1, params)",
             "    return jax.tree.map(lambda p: p.ndim >= 1, params)",
             (T + "test_optim.py::test_weight_decay_mask_leaves_out_biases_and_norms",)),
    Mutation("lars_learning_rate_before_momentum", "byol_jax/optim.py",
             "        optax.trace(decay=momentum, nesterov=False),\n        optax.scale_by_learning_rate(learning_rate),",
             "        optax.scale_by_learning_rate(learning_rate),\n        optax.trace(decay=momentum, nesterov=False),",
             (T + "test_independent.py::test_five_trainer_steps_follow_an_independent_loop",)),
    Mutation("conv_slices_ignore_the_cap", "byol_jax/networks.py",
             "    size = max(chunk, -(-n // MAX_CONV_SLICES))",
             "    size = chunk",
             (T + "test_networks.py::test_sliced_convolution_slices_are_what_the_rule_says",)),
    Mutation("slices_joined_after_every_convolution", "byol_jax/networks.py",
             "            return tuple(super(Conv, self).__call__(x) for x in inputs)",
             "            out = join_batch(tuple(super(Conv, self).__call__(x) for x in inputs))\n"
             "            return split_batch(out, inputs[0].shape[0])",
             (T + "test_networks.py::test_sliced_convolution_slices_are_what_the_rule_says",)),
    Mutation("batchnorm_gradient_drops_the_variance_term", "byol_jax/batchnorm.py",
             "(g - mean_g - x_hat * mean_gx)",
             "(g - mean_g)",
             (T + "test_batchnorm.py",)),
    Mutation("batchnorm_gradient_not_synced_across_replicas", "byol_jax/batchnorm.py",
             "        mean_g, mean_gx = lax.pmean((mean_g, mean_gx), axis_name)",
             "        pass",
             (T + "test_batchnorm.py::test_cross_replica_statistics_and_gradients_match_flax",)),
    Mutation("batchnorm_relu_mask_lets_zeros_through", "byol_jax/batchnorm.py",
             "jnp.where(y > 0, g, 0.0)",
             "jnp.where(y >= 0, g, 0.0)",
             (T + "test_batchnorm.py",)),
    Mutation("host_memory_keeps_per_thread_arenas", "byol_jax/host_memory.py",
             "settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),",
             "settings = ((_M_MMAP_MAX, 0),",
             (T + "test_host_memory.py",)),
    Mutation("host_memory_trims_above_2_gib", "byol_jax/host_memory.py",
             "(_M_TRIM_THRESHOLD, -1))",
             "(_M_TRIM_THRESHOLD, 2**31 - 1))",
             (T + "test_host_memory.py",)),
    Mutation("paused_time_counted", "byol_jax/monitor.py",
             "        self._time += self._clock() - start",
             "        pass",
             (T + "test_training.py::test_throughput_excludes_paused_time", T + "test_loop.py")),
    Mutation("metrics_of_checkpoint_steps_dropped", "byol_jax/loop.py",
             "                rows += [_checked(s, fetch(m), finite, checkpointer, hint) for s, m in pending]",
             "                rows = [_checked(s, fetch(m), finite, checkpointer, hint) for s, m in pending]",
             (T + "test_loop.py",)),
    Mutation("batchnorm_not_synced_by_default", "byol_jax/byol.py",
             "        sync = jax.lax.axis_size(axis) > 1 if self.sync_batchnorm is None else self.sync_batchnorm",
             "        sync = False if self.sync_batchnorm is None else self.sync_batchnorm",
             (T + "test_independent.py::test_step_matches_the_reference_when_the_target_differs",)),
    Mutation("unsyncable_encoder_silently_per_device", "byol_jax/byol.py",
             "        if self._encoder.can_sync or jax.lax.axis_size(axis) == 1:",
             "        if True:",
             (T + "test_byol.py::test_an_encoder_that_cannot_sync_its_batchnorm_is_refused_when_mapped",)),
    Mutation("nnx_batchnorm_not_synced", "byol_jax/encoders.py",
             "                sub.axis_name = axis_name  # None: this device's batch only",
             "                sub.axis_name = None",
             (T + "test_nnx.py::test_pmap_equals_one_device_equals_shard_map_with_cross_replica_batchnorm",)),
    Mutation("knn_temperature_ignored", "byol_jax/knn.py",
             "    weights = jnp.exp(top_sim / temperature)",
             "    weights = jnp.exp(top_sim)",
             (T + "test_evaluate.py",)),
    Mutation("host_crop_settings_ignored", "byol_jax/builders.py",
             "    if not config.data.host_crop:\n        return",
             "    if True:\n        return",
             (T + "test_training.py::test_bad_config_is_a_clear_error_before_compilation",)),
    Mutation("ignored_optimiser_settings_accepted", "byol_jax/optim.py",
             "    ignored = [k for k, v in given.items() if v is not None and k not in _READS[name]]",
             "    ignored = []",
             (T + "test_optim.py::test_settings_an_optimiser_ignores_are_refused",)),
    Mutation("warm_up_squeezed_into_the_run", "byol_jax/builders.py",
             "    steps = int(config.warmup_epochs * steps_per_epoch)\n",
             "    steps = min(int(config.warmup_epochs * steps_per_epoch), total_steps - 1)\n",
             (T + "test_training.py::test_bad_config_is_a_clear_error_before_compilation",)),
    Mutation("probe_on_an_unlabelled_split", "byol_jax/programs/pretraining.py",
             "    if not (config.online_probe and info.get(\"num_classes\")):",
             "    if True:",
             (T + "test_training.py::test_the_online_probe_needs_labels_in_the_pretraining_split",)),
    Mutation("host_resize_without_antialias", "byol_jax/image_ops.py",
             "    kernel_scale = max(inv_scale, np.float32(1))  # widen the kernel when shrinking",
             "    kernel_scale = np.float32(1)",
             (T + "test_image_ops.py", T + "test_data.py")),
    Mutation("torchvision_kernels_not_transposed", "byol_jax/weights/torchvision.py",
             '            _nested(params, module)["kernel"] = np.transpose(value, (2, 3, 1, 0))',
             '            _nested(params, module)["kernel"] = np.transpose(value, (3, 2, 1, 0)).reshape(np.transpose(value, (2, 3, 1, 0)).shape)',
             (T + "test_weights.py::test_torchvision_weights_give_torchvisions_outputs",)),
    Mutation("authors_target_taken_from_online", "byol_jax/pretrained.py",
             '        target, target_stats = official.to_byol_jax(raw["target_params"], raw["target_state"])',
             '        target, target_stats = official.to_byol_jax(raw["online_params"], raw["online_state"])',
             (T + "test_weights.py::test_the_authors_checkpoint_gives_their_networks_outputs",)),
    Mutation("authors_padding_symmetric", "byol_jax/pretrained.py",
             '        config = _recipe_config(arch.encoder_fields(), "same", arch.num_classes)',
             '        config = _recipe_config(arch.encoder_fields(), "symmetric", arch.num_classes)',
             (T + "test_weights.py::test_the_authors_checkpoint_gives_their_networks_outputs",)),
    Mutation("aot_batch_split_unchecked", "byol_jax/programs/ahead_of_time.py",
             "    if global_batch % len(devices):",
             "    if False:",
             (T + "test_aot.py::test_what_cannot_work_is_refused_before_compiling",)),
]  # fmt: skip


def scratch_copy(root: pathlib.Path) -> pathlib.Path:
    target = root / "repo"
    shutil.copytree(REPO, target, ignore=lambda d, names: [n for n in names if n in SKIP])
    return target


def run(mutation: Mutation, keep: bool) -> tuple[bool, str, float]:
    """(caught, the failing test or the reason, seconds)."""
    root = pathlib.Path(tempfile.mkdtemp(prefix=f"mutation_{mutation.name}_"))
    copy = scratch_copy(root)
    path = copy / mutation.file
    text = path.read_text()
    if text.count(mutation.old) != 1:
        return False, f"the text to mutate occurs {text.count(mutation.old)} times", 0.0
    path.write_text(text.replace(mutation.old, mutation.new))
    env = {
        **os.environ,
        "PYTHONPATH": str(copy),
        "JAX_COMPILATION_CACHE_DIR": str(REPO / ".cache" / "jax"),
    }
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider", *mutation.tests],
        cwd=copy, env=env, capture_output=True, text=True,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    failed = [
        line.split(" ")[1] for line in result.stdout.splitlines() if line.startswith("FAILED ")
    ]
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    if result.returncode == 0:
        return False, "every test passed: the mutation survives", seconds
    return True, (failed[0] if failed else result.stdout.strip().splitlines()[-1]), seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--only", nargs="*", help="names of mutations to run")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    rows, survived = ["| mutation | caught by | seconds |", "| --- | --- | --- |"], 0
    for mutation in chosen:
        caught, why, seconds = run(mutation, args.keep)
        survived += not caught
        rows.append(
            f"| {mutation.name} | {why if caught else 'NOT CAUGHT: ' + why} | {seconds:.0f} |"
        )
        print(rows[-1], flush=True)
    print("\n".join(rows))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
