"""Checkpoint service: exact resume, atomic saves under SIGKILL, damage, mismatch, full disk."""

import glob
import json
import logging
import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import time

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from byol_jax import checkpoint as ck

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP_SUFFIX = ".orbax-checkpoint-tmp"


@flax.struct.dataclass
class _State:
    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    rng: jax.Array  # random uint32 words: incompressible, so zstd stores them raw
    ema: dict | None = None


_OPTIMISER = optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-4))


def _state(seed: int, sharding=None) -> _State:
    """A train-state-like pytree: dataclass, namedtuples (Adam, EmptyState), None, 3 dtypes."""
    k = jax.random.split(jax.random.key(seed), 4)
    params = {
        "Dense_0": {"kernel": jax.random.normal(k[0], (16, 8)), "bias": jnp.zeros(8)},
        "head": {"kernel": jax.random.normal(k[1], (8, 4)).astype(jnp.bfloat16)},
    }
    opt_state = _OPTIMISER.init(params)
    opt_state = jax.tree.map(
        lambda x: x + (jax.random.uniform(k[2], x.shape) if x.dtype == jnp.float32 else seed),
        opt_state,
    )
    state = _State(
        step=jnp.asarray(seed, jnp.int32),
        params=params,
        batch_stats={"BatchNorm_0": {"mean": jax.random.normal(k[3], (8,)), "var": jnp.ones(8)}},
        opt_state=opt_state,
        rng=jax.random.bits(k[3], (4096,)),  # the largest data file
    )
    return state if sharding is None else jax.device_put(state, sharding)


def _assert_identical(restored, expected, template):
    """Same pytree (types included), dtypes, bits, and the template's shardings."""
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    assert type(restored.opt_state[0]) is optax.ScaleByAdamState
    assert isinstance(restored.opt_state[1], optax.EmptyState) and restored.ema is None
    leaves = zip(
        jax.tree.leaves(restored), jax.tree.leaves(expected), jax.tree.leaves(template), strict=True
    )
    for got, want, tmpl in leaves:
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
        assert got.sharding == tmpl.sharding


def _step_dirs(directory):
    return sorted(os.listdir(directory))


def _wait_for_tmp_cleanup(directory, timeout=10.0):
    """Orbax deletes leftover tmp directories in a background thread after opening."""
    deadline = time.monotonic() + timeout
    while any(TMP_SUFFIX in d for d in os.listdir(directory)):
        assert time.monotonic() < deadline, f"tmp directories left: {os.listdir(directory)}"
        time.sleep(0.05)


# ----------------------------------------------------------------------------- resume


def test_resume_single_device_is_bit_identical(tmp_path):
    state = _state(7)
    with ck.Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.restore_latest(_state(0)) is None
        assert checkpointer.save(100, state)
    template = _state(0)
    state_back, step = ck.Checkpointer(tmp_path).restore_latest(template)
    assert step == 100
    _assert_identical(state_back, state, template)


def test_resume_onto_8_replicated_devices(tmp_path):
    mesh = jax.make_mesh((8,), ("batch",))
    replicated = NamedSharding(mesh, P())
    saved_single = _state(3)
    saved_replicated = _state(4, replicated)
    with ck.Checkpointer(tmp_path / "single") as checkpointer:
        checkpointer.save(1, saved_single)
    with ck.Checkpointer(tmp_path / "replicated") as checkpointer:
        checkpointer.save(2, saved_replicated)
    template = _state(0, replicated)
    for name, saved in (("single", saved_single), ("replicated", saved_replicated)):
        restored, _ = ck.Checkpointer(tmp_path / name).restore_latest(template)
        _assert_identical(restored, saved, template)
        assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(restored))
    # The abstract template keeps shardings and restores the same way.
    abstract = ck.abstract_like(template)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
    restored, _ = ck.Checkpointer(tmp_path / "single").restore_latest(abstract)
    _assert_identical(restored, saved_single, template)


def test_keeps_last_n_and_refuses_to_go_back(tmp_path):
    with ck.Checkpointer(tmp_path, max_to_keep=2) as checkpointer:
        for step in range(1, 6):
            assert checkpointer.save(step, {"w": jnp.full((3,), step, jnp.float32)})
        checkpointer.wait_until_finished()
        assert checkpointer.all_steps() == [4, 5] and checkpointer.latest_step() == 5
        assert not checkpointer.save(5, {"w": jnp.zeros(3)})  # already saved: a no-op
        with pytest.raises(ck.CheckpointError, match="already holds step 5"):
            checkpointer.save(2, {"w": jnp.zeros(3)})
    assert _step_dirs(tmp_path) == ["4", "5"]
    restored = ck.Checkpointer(tmp_path).restore(4, {"w": jnp.zeros(3)})
    np.testing.assert_array_equal(restored["w"], [4, 4, 4])


# ----------------------------------------------------------------------------- SIGKILL

_SAVER = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp
    from byol_jax import checkpoint as ck

    def make(step, n):
        return {"w": step + jax.random.uniform(jax.random.key(step), (n,)), "s": jnp.int32(step)}

    checkpointer = ck.Checkpointer(sys.argv[1], max_to_keep=2)
    restored = checkpointer.restore_latest(make(0, int(sys.argv[2])))
    step = 0 if restored is None else restored[1]
    while True:
        step += 1
        checkpointer.save(step, make(step, int(sys.argv[2])))
        print("saving", step, flush=True)
    """
)


def _kill_state(step, n):
    return {"w": step + jax.random.uniform(jax.random.key(step), (n,)), "s": jnp.int32(step)}


def _wait_for_line(proc, prefix, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.2)[0]:
            line = proc.stdout.readline()
            if line.startswith(prefix):
                return line
            if not line and proc.poll() is not None:
                break
    pytest.fail(f"saver never printed {prefix!r} (exit code {proc.poll()})")


@pytest.mark.slow
def test_sigkill_during_saves_never_breaks_the_next_start(tmp_path):
    """A saver writes a 24 MB state in a loop (~0.3 s a save) and is SIGKILLed at random
    moments; each time a fresh Checkpointer restores the newest complete step exactly."""
    n, kills, rng = 6_000_000, 5, random.Random(0)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    last_step, killed_mid_write = 0, []
    for _ in range(kills):
        proc = subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(tmp_path), str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=REPO,
            env=env,
        )
        try:
            _wait_for_line(proc, f"saving {last_step + 2}", timeout=60)  # last_step + 1 done
            time.sleep(rng.uniform(0.0, 0.8))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        leftovers = [d for d in os.listdir(tmp_path) if TMP_SUFFIX in d]
        killed_mid_write.append(bool(leftovers))
        checkpointer = ck.Checkpointer(tmp_path, max_to_keep=2)
        state, step = checkpointer.restore_latest(_kill_state(0, n))
        assert step > last_step
        expected = _kill_state(step, n)
        np.testing.assert_array_equal(state["w"], expected["w"])
        assert int(state["s"]) == step and np.floor(state["w"]).min() == step
        _wait_for_tmp_cleanup(tmp_path)  # removed after opening
        checkpointer.close()
        last_step = step
    print(f"survived {kills}/{kills} SIGKILLs, {sum(killed_mid_write)} mid-write")


# ----------------------------------------------------------------------------- damage


def _largest_data_file(step_dir):
    return max(glob.glob(f"{step_dir}/default/ocdbt.process_0/d/*"), key=os.path.getsize)


def _truncate(step_dir):
    path = _largest_data_file(step_dir)
    os.truncate(path, os.path.getsize(path) // 2)


def _overwrite(step_dir):
    path = _largest_data_file(step_dir)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\xde\xad\xbe\xef" * 4)


def _delete_step_metadata(step_dir):
    os.remove(f"{step_dir}/_CHECKPOINT_METADATA")


def _delete_tree_metadata(step_dir):
    os.remove(f"{step_dir}/default/_METADATA")


_DAMAGE = {
    "truncated": (_truncate, "reading its arrays failed"),
    "overwritten": (_overwrite, "does not match its checksum"),
    "no_step_metadata": (_delete_step_metadata, "checksum record"),
    "no_tree_metadata": (_delete_tree_metadata, "tree metadata"),
}


def _save_steps(directory, steps):
    with ck.Checkpointer(directory) as checkpointer:
        for step in steps:
            checkpointer.save(step, _state(step))


# Orbax leaves a coroutine un-awaited after a failed read or write; harmless.
_ORBAX_UNAWAITED = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@_ORBAX_UNAWAITED
@pytest.mark.parametrize("damage", sorted(_DAMAGE))
def test_damaged_newest_falls_back_with_warning(tmp_path, caplog, damage):
    damage_fn, reason = _DAMAGE[damage]
    _save_steps(tmp_path, [1, 2, 3])
    damage_fn(tmp_path / "3")
    checkpointer = ck.Checkpointer(tmp_path)
    with pytest.raises(ck.DamagedCheckpointError, match=f"step 3 in {tmp_path}: .*{reason}"):
        checkpointer.restore(3, _state(0))
    with caplog.at_level(logging.WARNING, logger=ck.__name__):
        state, step = checkpointer.restore_latest(_state(0))
    assert step == 2
    _assert_identical(state, _state(2), _state(0))
    warning = next(r.getMessage() for r in caplog.records if "damaged (" in r.getMessage())
    assert "step 3" in warning and reason in warning
    # The damaged step is kept aside, so training can write step 3 again.
    assert _step_dirs(tmp_path) == ["1", "2", "3.damaged"]
    assert checkpointer.save(3, state)
    checkpointer.close()
    assert ck.Checkpointer(tmp_path).restore_latest(_state(0))[1] == 3


@_ORBAX_UNAWAITED
def test_all_damaged_refuses_and_keeps_them(tmp_path):
    _save_steps(tmp_path, [1, 2])
    _overwrite(tmp_path / "2")
    _delete_tree_metadata(tmp_path / "1")
    checkpointer = ck.Checkpointer(tmp_path)
    with pytest.raises(ck.DamagedCheckpointError, match="step 2"):
        checkpointer.restore(2, _state(0))
    with pytest.raises(ck.DamagedCheckpointError) as error:
        checkpointer.restore_latest(_state(0))
    message = str(error.value)
    assert str(tmp_path) in message and "step 2: leaf" in message and "step 1: its tree" in message
    assert "Refusing to start training" in message and "fresh --workdir" in message
    assert _step_dirs(tmp_path) == ["1", "2"]  # nothing moved or deleted
    with pytest.raises(ck.CheckpointError, match="already holds step 2"):
        checkpointer.save(1, _state(1))  # a from-scratch run cannot write over them
    checkpointer.close()


@_ORBAX_UNAWAITED
def test_read_only_falls_back_without_touching_the_directory(tmp_path):
    _save_steps(tmp_path, [1, 2])
    _truncate(tmp_path / "2")
    before = sorted(glob.glob(f"{tmp_path}/**", recursive=True))
    state, step = ck.load_latest(tmp_path, _state(0))
    assert step == 1 and int(state.step) == 1
    assert sorted(glob.glob(f"{tmp_path}/**", recursive=True)) == before


# ----------------------------------------------------------------------------- mismatch


def test_other_architecture_names_the_leaf(tmp_path):
    _save_steps(tmp_path, [5])
    wider = _state(0).replace(params={**_state(0).params, "head": {"kernel": jnp.zeros((8, 5))}})
    checkpointer = ck.Checkpointer(tmp_path)
    with pytest.raises(ck.ArchitectureMismatchError) as error:
        checkpointer.restore_latest(wider)
    message = str(error.value)
    assert isinstance(error.value, ValueError)
    assert f"checkpoint in {tmp_path} (step 5) was written for a different model" in message
    assert "'params/head/kernel' is stored as (8, 4) bfloat16" in message
    assert "expects (8, 5) float32" in message
    extra = _state(0).replace(ema={"w": jnp.zeros(3)})
    with pytest.raises(
        ck.ArchitectureMismatchError, match=r"checkpoint lacks: \['ema/w \(3,\) float32'\]"
    ):
        checkpointer.restore_latest(extra)
    assert _step_dirs(tmp_path) == ["5"]  # a mismatch is not damage: nothing is moved


# ----------------------------------------------------------------------------- write failures


@_ORBAX_UNAWAITED
def test_out_of_disk_leaves_no_checkpoint(tmp_path, monkeypatch):
    from orbax.checkpoint._src.path import async_path

    checkpointer = ck.Checkpointer(tmp_path)
    checkpointer.save(1, _state(1))
    checkpointer.wait_until_finished()

    async def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(async_path, "write_text", disk_full)
    with pytest.raises(ck.CheckpointError, match="step 2.*the disk is full"):
        checkpointer.save(2, _state(2))
        checkpointer.wait_until_finished()
    monkeypatch.undo()
    assert checkpointer.all_steps() == [1]
    assert _step_dirs(tmp_path) == ["1", "2" + TMP_SUFFIX]
    # Space is back: the failure was reported once, and training goes on saving.
    assert checkpointer.save(3, _state(3))
    checkpointer.close()
    state, step = ck.Checkpointer(tmp_path).restore_latest(_state(0))
    assert step == 3
    _assert_identical(state, _state(3), _state(0))


_FULL_DISK = textwrap.dedent(
    """
    import json, os, sys, time
    import jax, jax.numpy as jnp
    from byol_jax import checkpoint as ck

    directory = sys.argv[1]
    out = {}
    with ck.Checkpointer(directory) as checkpointer:
        checkpointer.save(1, {"w": jnp.ones(1000)})
        checkpointer.wait_until_finished()
        try:
            checkpointer.save(2, {"w": jax.random.uniform(jax.random.key(0), (2_000_000,))})
            checkpointer.wait_until_finished()
        except ck.CheckpointError as e:
            out["error"] = str(e)
    out["after_failure"] = sorted(os.listdir(directory))
    state, step = ck.Checkpointer(directory).restore_latest({"w": jnp.zeros(1000)})
    deadline = time.time() + 10
    out.update(step=step, ok=bool((state["w"] == 1).all()))
    while any("tmp" in d for d in os.listdir(directory)) and time.time() < deadline:
        time.sleep(0.05)  # orbax removes leftover tmp directories in the background
    out["reopened"] = sorted(os.listdir(directory))
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_real_full_disk_on_a_tiny_tmpfs(tmp_path):
    """A 2 MB tmpfs in a private mount namespace (unshare); skipped where that is not allowed."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    setup = f"mount -t tmpfs -o size=2m tmpfs {mount}"
    if subprocess.run(["unshare", "-rm", "sh", "-c", setup], capture_output=True).returncode:
        pytest.skip("no unshare/mount rights to build a tiny tmpfs")
    script = tmp_path / "full_disk.py"
    script.write_text(_FULL_DISK)
    run = f'{setup} && exec "{sys.executable}" {script} {mount}/ckpt'
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", run],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "writing checkpoint step 2" in out["error"] and "the disk is full" in out["error"]
    assert out["after_failure"] == ["1", "2" + TMP_SUFFIX]  # the tmp dir is never a step
    assert out["step"] == 1 and out["ok"] and out["reopened"] == ["1"]


def test_unwritable_directory_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ck.CheckpointError, match="cannot write checkpoints to .*file/ckpt"):
        ck.Checkpointer(tmp_path / "file" / "ckpt")


def test_state_orbax_cannot_store_is_refused_before_writing(tmp_path):
    with ck.Checkpointer(tmp_path) as checkpointer:
        with pytest.raises(ValueError, match="'params/w' has zero size"):
            checkpointer.save(1, {"params": {"w": jnp.zeros((0, 3))}})
        with pytest.raises(TypeError, match="'name' is a str"):
            checkpointer.save(1, {"name": "resnet"})
    assert _step_dirs(tmp_path) == []


# ----------------------------------------------------------------------------- checksums


def test_checksums_agree_on_host_and_device_and_catch_one_changed_word():
    k = jax.random.key(1)
    arrays = [
        jax.random.normal(k, (33, 7)),
        jax.random.normal(k, (5,)).astype(jnp.bfloat16),
        jax.random.randint(k, (9,), -100, 100),
        jax.random.bernoulli(k, 0.5, (11,)),
    ]
    for x in arrays:
        device = [int(s) for s in jax.jit(lambda x: ck._sums(x, jnp))(x)]
        assert device == [int(s) for s in ck._sums(np.asarray(x), np)]
    x = np.arange(10, dtype=np.float32)
    swapped, bumped = x[[1, 0, *range(2, 10)]], x.copy()
    bumped.view(np.uint32)[4] ^= 1
    sums = [int(s) for s in ck._sums(x, np)]
    assert [int(s) for s in ck._sums(swapped, np)][1] != sums[1]
    assert [int(s) for s in ck._sums(bumped, np)] != sums


# ----------------------------------------------------------------------------- workdir


def test_config_roundtrip_is_atomic(tmp_path, monkeypatch):
    config = ml_collections.ConfigDict({"model": {"depth": 18}, "lr": 0.2, "crops": [224, 96]})
    path = ck.save_config(tmp_path, config)
    assert ck.load_config(tmp_path) == config.to_dict() == json.load(open(path))

    def crash(*args):
        raise OSError("crash during replace")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="crash"):
        ck.save_config(tmp_path, {"model": {"depth": 50}})
    monkeypatch.undo()
    assert ck.load_config(tmp_path)["model"]["depth"] == 18  # old config intact
    assert os.listdir(tmp_path) == ["config.json"]  # no temp file left
    with pytest.raises(TypeError, match="JSON values"):
        ck.save_config(tmp_path, {"f": object()})


def test_empty_workdir_says_train_first(tmp_path):
    hint = f"train first with: python -m byol_jax.train --workdir {tmp_path}"
    for load in (lambda: ck.load_config(tmp_path), lambda: ck.load_latest(tmp_path, _state(0))):
        with pytest.raises(ck.CheckpointError) as error:
            load()
        assert hint in str(error.value)
    missing = tmp_path / "checkpoints"
    with pytest.raises(
        ck.CheckpointError, match=f"no checkpoint in {missing}: .*--workdir {tmp_path}$"
    ):
        ck.load_latest(missing, _state(0), workdir=tmp_path)
    assert not missing.exists()
