"""Checkpoint service: save and resume one training-state pytree with orbax.

A `Checkpointer` wraps `orbax.checkpoint.CheckpointManager`:

- Saves are asynchronous and atomic: orbax writes step N into `N.orbax-checkpoint-tmp`
  and renames it to `N` only once every file is written, so a killed or failed write never
  leaves a directory that looks like a checkpoint; leftover tmp directories are ignored by
  the step listing and deleted in the background once the next `Checkpointer` opens the
  directory.
- The last `max_to_keep` checkpoints are kept.
- `restore_latest` checks the newest checkpoint and falls back to an older one, with a
  warning, when it is damaged; if none can be read it raises `DamagedCheckpointError`
  rather than let training start from scratch over them.
- A checkpoint written for another model raises `ArchitectureMismatchError`, naming a leaf.

Multi-host: every process calls `save`, `restore`, `restore_latest` and `close` with the
same arguments; orbax synchronises the processes, writes each process's shards and lets the
primary process write the metadata and rename the directory. The checkpoint directory must be
on a file system every process sees.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
PRUNED = ".pruned"
_CHECKSUMS = "byol_jax_checksums"
_DAMAGED_SUFFIX = ".damaged"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read."""


class DamagedCheckpointError(CheckpointError):
    """Every checkpoint in a directory is unreadable: training must not start over them."""


class ArchitectureMismatchError(CheckpointError, ValueError):
    """A checkpoint holds a pytree of another structure or other leaf shapes than the model."""


# ----------------------------------------------------------------------------- pytree helpers


def _leaves_by_name(tree) -> dict[str, Any]:
    """Flattens `tree` to {'params/Dense_0/kernel': leaf}; dataclass, namedtuple and dict keys
    become names, so the template and orbax's stored metadata (dicts and lists) compare."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in flat}


def abstract_like(state):
    """The restore target for `state`: jax arrays become `jax.ShapeDtypeStruct`s with the same
    shape, dtype and sharding (restored arrays land on that sharding); numpy arrays, Python
    ints/floats and existing `ShapeDtypeStruct`s are kept (orbax restores them as that type);
    numpy scalars become 0-d numpy arrays, which is how orbax stores them."""

    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, np.generic):
            return np.asarray(x)
        return x

    return jax.tree.map(leaf, state)


_LEAF_TYPES = (jax.Array, jax.ShapeDtypeStruct, np.ndarray, np.generic, int, float)


def _check_leaves(tree, what: str):
    """Raises TypeError/ValueError for leaves orbax cannot store; better here than as a
    failed background write."""
    for name, x in _leaves_by_name(tree).items():
        if not isinstance(x, _LEAF_TYPES):
            raise TypeError(
                f"{what} leaf '{name}' is a {type(x).__name__}; checkpoints hold jax or numpy "
                "arrays and Python ints/floats only"
            )
        size = x.size if isinstance(x, jax.ShapeDtypeStruct) else np.size(x)
        if size == 0:
            raise ValueError(
                f"{what} leaf '{name}' has zero size (shape {np.shape(x)}): orbax cannot "
                "save empty arrays; use None or an empty dict for an absent part of the state"
            )


# ----------------------------------------------------------------------------- checksums
# Orbax/TensorStore store no data checksum: bytes overwritten inside a data file are restored
# silently. We record two 32-bit sums of each leaf's bits at save time (in the step's
# _CHECKPOINT_METADATA) and compare after restore. Sums run on device, under jit, so sharded
# and multi-host arrays need no gather; uint32 arithmetic wraps identically in numpy and XLA.


def _words(x, xp):
    """The bits of array `x` as a flat uint32 vector (xp is numpy or jax.numpy)."""
    if xp.iscomplexobj(x):
        x = xp.stack([x.real, x.imag])
    if x.dtype == bool:
        x = x.astype(xp.uint8)
    unsigned = np.dtype(f"uint{8 * x.dtype.itemsize}")
    if xp is np:
        words = np.ascontiguousarray(x).view(unsigned)
        words = words.view(np.uint32) if unsigned.itemsize == 8 else words
    else:
        words = jax.lax.bitcast_convert_type(x, unsigned)
        if unsigned.itemsize == 8:
            words = jax.lax.bitcast_convert_type(words, jnp.uint32)
    return words.astype(xp.uint32).reshape(-1)


def _sums(x, xp):
    """(sum of words, position-weighted sum of words), both mod 2**32: catches changed,
    zeroed and reordered words."""
    words = _words(x, xp)
    odd = xp.arange(words.size, dtype=xp.uint32) * xp.uint32(2) + xp.uint32(1)
    return xp.sum(words, dtype=xp.uint32), xp.sum(words * odd, dtype=xp.uint32)


_device_sums = jax.jit(lambda xs: [_sums(x, jnp) for x in xs])


def _checksums(tree) -> dict[str, list[int]]:
    """{leaf name: [sum, weighted sum]} for every leaf of `tree`."""
    leaves = _leaves_by_name(tree)
    by_devices: dict[frozenset, list[str]] = {}
    out = {}
    for name, x in leaves.items():
        if isinstance(x, jax.Array):
            by_devices.setdefault(frozenset(x.sharding.device_set), []).append(name)
        else:
            out[name] = [int(s) for s in _sums(np.asarray(x), np)]
    for names in by_devices.values():  # one jit per device set (usually one)
        sums = jax.device_get(_device_sums([leaves[n] for n in names]))
        out.update({n: [int(a), int(b)] for n, (a, b) in zip(names, sums, strict=True)})
    return out


# ----------------------------------------------------------------------------- checks


def _dtype(leaf):
    return getattr(leaf, "dtype", None)  # Python ints and floats have none


def _describe(shape, dtype) -> str:
    return f"{tuple(shape)} {np.dtype(dtype).name if dtype is not None else ''}".rstrip()


def _architecture_mismatch(stored: dict, expected: dict) -> str | None:
    """Names the first leaf where the stored metadata and the template differ, or None."""
    missing = sorted(expected.keys() - stored.keys())
    extra = sorted(stored.keys() - expected.keys())
    if missing or extra:
        missing = [f"{n} {_describe(np.shape(expected[n]), _dtype(expected[n]))}" for n in missing]
        extra = [f"{n} {_describe(stored[n].shape, stored[n].dtype)}" for n in extra]
        return (
            f"the model has leaves the checkpoint lacks: {missing[:3]}; "
            f"the checkpoint has leaves the model lacks: {extra[:3]}"
        )
    for name, meta in stored.items():
        want = expected[name]
        want_dtype = _dtype(want)
        same_shape = tuple(meta.shape) == tuple(np.shape(want))
        if not same_shape or (want_dtype is not None and np.dtype(meta.dtype) != want_dtype):
            return (
                f"leaf '{name}' is stored as {_describe(meta.shape, meta.dtype)} but the "
                f"model expects {_describe(np.shape(want), want_dtype)}"
            )
    return None


def _first_line(error: BaseException, head: int = 200, tail: int = 150) -> str:
    """The error's first line, middle elided: TensorStore puts the OS error at the end."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > head + tail:
        text = f"{text[:head]} ... {text[-tail:]}"
    return f"{type(error).__name__}: {text}"


# ----------------------------------------------------------------------------- checkpointer


class Checkpointer:
    """Saves and restores one state pytree under `directory/<step>`.

    Args:
      directory: the checkpoint directory (created if missing unless `read_only`).
      max_to_keep: how many of the newest checkpoints to keep.
      async_save: write in a background thread; `save` returns once the arrays are copied to
        host memory. Call `wait_until_finished` (or `close`) before the program exits.
      read_only: for evaluation programs: never writes, creates, renames or deletes.
    """

    def __init__(self, directory, *, max_to_keep=3, async_save=True, read_only=False):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.read_only = read_only
        self._pending_step = None
        self._barriers = 0
        if not read_only:
            _check_writable(self.directory)
        # Leftover `<step>.orbax-checkpoint-tmp` directories of a killed run are deleted in
        # a background thread that the first save waits for.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep,
            save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=async_save,
            read_only=read_only,
            create=not read_only,
            cleanup_tmp_directories=not read_only,
            # Pruning an old step is then one atomic rename into PRUNED (a kill can no longer
            # leave a half-deleted step that still looks like a checkpoint); we empty it.
            todelete_subdir=None if read_only else PRUNED,
        )
        try:
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
            )
        except OSError as e:
            raise CheckpointError(f"cannot open checkpoint directory {self.directory}: {e}") from e
        if not read_only:
            self._empty_pruned()

    def _empty_pruned(self):
        """Delete the steps orbax pruned (process 0; a kill midway is harmless)."""
        if jax.process_index() == 0:
            shutil.rmtree(os.path.join(self.directory, PRUNED), ignore_errors=True)

    # -- context manager
    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step (not checked for damage), or None."""
        return self._manager.latest_step()

    def save(self, step: int, state, *, force: bool = False) -> bool:
        """Starts writing `state` as checkpoint `step`; returns whether a save was started.

        Every process calls it. Saving the latest stored step again is a no-op (False); saving
        an older step raises: the directory holds a later run's checkpoints. `force` saves
        even where orbax's save policy would skip the step (as at a preemption).
        Raises CheckpointError when writing fails (out of disk, unwritable directory); the
        incomplete `<step>.orbax-checkpoint-tmp` is never taken for a checkpoint.
        """
        if self.read_only:
            raise CheckpointError(f"Checkpointer on {self.directory} is read-only: cannot save")
        self.wait_until_finished()  # the previous save, and its pruning, are done
        self._empty_pruned()
        latest = self.latest_step()
        if latest is not None and step == latest:
            return False
        if latest is not None and step < latest:
            raise CheckpointError(
                f"refusing to save step {step} in {self.directory}: it already holds step "
                f"{latest}. Resume with restore_latest() first, or pass a fresh workdir."
            )
        _check_leaves(state, "state")
        self.wait_until_finished()  # reports a failed previous save under its own step
        checksums = _checksums(state)
        with _write_errors(self.directory, step):
            saved = self._manager.save(
                step,
                args=ocp.args.StandardSave(state),
                force=force,
                custom_metadata={_CHECKSUMS: checksums},
            )
        if saved:
            self._pending_step = step
        return saved

    def wait_until_finished(self):
        """Blocks until the asynchronous save is on disk; raises CheckpointError if it failed."""
        try:
            with _write_errors(self.directory, self._pending_step):
                self._manager.wait_until_finished()  # raises a failure once
        finally:
            self._pending_step = None

    def close(self):
        """Waits for the pending save, then releases orbax's threads."""
        try:
            self.wait_until_finished()
            if not self.read_only:
                self._empty_pruned()
        finally:
            self._manager.close()

    # -- restore
    def restore(self, step: int, template_state):
        """Restores checkpoint `step` onto the structure, dtypes and shardings of
        `template_state` (concrete arrays or `abstract_like` output).

        Raises ArchitectureMismatchError if the checkpoint was written for another model and
        DamagedCheckpointError if it cannot be read or its contents changed since saving.
        """
        if step not in self.all_steps():
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory}; "
                f"steps there: {self.all_steps()}"
            )
        state, reason = self._try_restore(step, template_state)
        if reason is not None:
            raise DamagedCheckpointError(f"checkpoint step {step} in {self.directory}: {reason}")
        return state

    def restore_latest(self, template_state):
        """Restores the newest readable checkpoint: (state, step), or None if there is none.

        A damaged newer checkpoint is skipped with a warning and (unless read-only) renamed to
        `<step>.damaged` so that training can write that step again. If every checkpoint is
        damaged, raises DamagedCheckpointError: the caller must stop, not train from scratch.
        """
        self.wait_until_finished()
        failures = []
        for step in reversed(self.all_steps()):
            state, reason = self._try_restore(step, template_state)
            if reason is None:
                self._quarantine([s for s, _ in failures])
                return state, step
            log.warning(
                "checkpoint step %d in %s is damaged (%s); trying an older one",
                step,
                self.directory,
                reason,
            )
            failures.append((step, reason))
        if not failures:
            return None
        listing = "; ".join(f"step {s}: {r}" for s, r in failures)
        raise DamagedCheckpointError(
            f"no readable checkpoint in {self.directory} ({listing}). Refusing to start "
            "training over them. To recover, move the directory away (or delete the damaged "
            "steps) and rerun, or pass a fresh --workdir."
        )

    def _try_restore(self, step, template_state):
        """(state, None) on success, (None, reason) if step is damaged; raises on mismatch."""
        target = abstract_like(template_state)
        _check_leaves(target, "template_state")
        expected = _leaves_by_name(target)
        try:
            tree_meta = self._manager.item_metadata(step)
            stored = _leaves_by_name(tree_meta.tree) if tree_meta is not None else None
        except Exception as e:  # any failure to read metadata means damage
            return None, f"its tree metadata cannot be read ({_first_line(e)})"
        if stored is None or (not stored and expected):
            return None, "its tree metadata (default/_METADATA) is missing"
        mismatch = _architecture_mismatch(stored, expected)
        if mismatch is not None:
            raise ArchitectureMismatchError(
                f"the checkpoint in {self.directory} (step {step}) was written for a different "
                f"model: {mismatch}. Use the config it was trained with (the {CONFIG_FILE} in "
                "its workdir) or pass a fresh --workdir."
            )
        try:
            saved_sums = (self._manager.metadata(step).custom_metadata or {}).get(_CHECKSUMS)
        except Exception:
            saved_sums = None
        if saved_sums is None:
            return None, "its checksum record (_CHECKPOINT_METADATA) is missing or unreadable"
        try:
            state = self._manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as e:  # TensorStore raises ValueError, OSError, ...
            return None, f"reading its arrays failed ({_first_line(e)})"
        sums = _checksums(state)
        for name, value in sums.items():
            if saved_sums.get(name) != value:
                return None, f"leaf '{name}' does not match its checksum: file contents changed"
        return state, None

    def _quarantine(self, steps):
        """Renames damaged newer steps to `<step>.damaged[-k]` (kept for inspection; orbax
        no longer lists them) so training can save those steps again."""
        if self.read_only or not steps:
            return
        if jax.process_index() == 0:
            for step in steps:
                source = os.path.join(self.directory, str(step))
                target, k = source + _DAMAGED_SUFFIX, 0
                while os.path.exists(target):
                    k += 1
                    target = f"{source}{_DAMAGED_SUFFIX}-{k}"
                os.rename(source, target)
                log.warning("moved damaged checkpoint %s to %s", source, target)
        self._barriers += 1
        ocp.multihost.sync_global_processes(f"byol_jax_checkpoint_quarantine_{self._barriers}")
        self._manager.reload()


@contextlib.contextmanager
def _write_errors(directory: str, step):
    """Turns a failed (possibly asynchronous) write into a CheckpointError that says why."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as error:
        hint = "check that it is writable and has free space"
        if _is_disk_full(error):
            hint = "the disk is full: free space or use a larger disk"
        raise CheckpointError(
            f"writing checkpoint step {step} to {directory} failed ({_first_line(error)}); "
            f"{hint}. The incomplete write is left as a '.orbax-checkpoint-tmp' directory, which "
            "is never restored and is removed on the next start."
        ) from error


def _is_disk_full(error: BaseException) -> bool:
    while error is not None:
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _check_writable(directory: str):
    """Creates `directory` and writes a probe file, raising CheckpointError if it cannot."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise CheckpointError(
            f"cannot write checkpoints to {directory}: {e}. Pass a --workdir on a writable disk."
        ) from e


# ----------------------------------------------------------------------------- workdir helpers


def save_config(directory, config) -> str:
    """Writes the run's config (a mapping or ml_collections ConfigDict) as
    `directory/config.json`, atomically (temp file in the same directory, then os.replace),
    on process 0 only. Returns the file's path."""
    directory = os.fspath(directory)
    path = os.path.join(directory, CONFIG_FILE)
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping or a ConfigDict, got {type(config).__name__}")
    try:
        text = json.dumps(config, indent=2, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"config must hold only JSON values (numbers, strings, lists): {e}") from e
    if jax.process_index() != 0:
        return path
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{CONFIG_FILE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _train_first(directory) -> str:
    return f"train first with: python -m byol_jax.train --workdir {directory}"


def load_config(directory) -> dict:
    """Reads `directory/config.json` written by `save_config`."""
    path = os.path.join(os.fspath(directory), CONFIG_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"no {CONFIG_FILE} in {directory}: {_train_first(directory)}")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is not valid JSON ({e})") from e


def load_latest(directory, template_state, *, workdir=None):
    """For evaluation programs: (state, step) of the newest readable checkpoint in
    `directory`, read-only. Raises CheckpointError if there is none; its message names the
    run's `workdir` (default: `directory`) in the command that trains one."""
    directory = os.fspath(directory)
    missing = f"no checkpoint in {directory}: {_train_first(workdir or directory)}"
    if not os.path.isdir(directory):
        raise CheckpointError(missing)
    with Checkpointer(directory, read_only=True) as checkpointer:
        restored = checkpointer.restore_latest(template_state)
    if restored is None:
        raise CheckpointError(missing)
    return restored
