"""Running the per-replica step over devices: ``jax.pmap`` or ``jax.shard_map``, and hosts.

A ``Replicas`` object knows the device axis and converts between the host world (one state,
one process-local batch of numpy images) and the device world:

* ``mode='pmap'``: the state carries a leading axis of local devices; the step is
  ``jax.pmap``-ed. This is what most BYOL users know (and what the paper's code did).
* ``mode='shard_map'``: the state is one replicated global array per leaf on a 1-D mesh of all
  devices; the step is ``jax.jit(jax.shard_map(...))``. pmap is in maintenance mode in
  current JAX; this is its successor.

Both run the same per-replica function, with the same axis name, so their results agree.
"""

from __future__ import annotations

import collections
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any
MODES = ("pmap", "shard_map")


def _shard_map(fn, mesh, in_specs, out_specs):
    # The step averages gradients itself (pmap semantics), so replication checks are off.
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


class Replicas:
    """The device axis a per-replica step runs over.

    Args:
      mode: 'pmap' or 'shard_map'.
      axis_name: the axis name the per-replica step uses (``BYOL.axis_name``).
      devices: the global devices to use; default all (``jax.devices()``), ordered by
        process so that each process feeds its own devices.
    """

    def __init__(self, mode: str = "shard_map", axis_name: str = "batch", devices=None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        self.mode = mode
        self.axis_name = axis_name
        devices = list(devices) if devices is not None else jax.devices()
        self.devices = sorted(devices, key=lambda d: (d.process_index, d.id))
        self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
        mesh_devices = self.local_devices if mode == "pmap" else self.devices
        self.mesh = Mesh(np.array(mesh_devices), (axis_name,))
        self._compiled: dict[Any, Callable] = {}

    @property
    def num_replicas(self) -> int:
        """Devices over all processes: the global batch is split into this many parts."""
        return len(self.devices)

    @property
    def num_local(self) -> int:
        return len(self.local_devices)

    def check_batch_size(self, global_batch_size: int) -> int:
        """The per-device batch; a clear error if the global batch does not split evenly."""
        if global_batch_size % self.num_replicas:
            raise ValueError(
                f"batch_size={global_batch_size} is not divisible by the {self.num_replicas} "
                f"devices: use a multiple of {self.num_replicas} (e.g. "
                f"{max(1, global_batch_size // self.num_replicas) * self.num_replicas})."
            )
        return global_batch_size // self.num_replicas

    # ------------------------------------------------------------------- host <-> devices

    def replicate(self, tree: PyTree) -> PyTree:
        """One host copy of a pytree -> the device form the mapped step takes."""
        if self.mode == "pmap":
            n = self.num_local
            sharding = NamedSharding(self.mesh, P(self.axis_name))
            return jax.tree.map(
                lambda x: jax.device_put(
                    np.broadcast_to(np.asarray(x), (n, *np.shape(x))), sharding
                ),
                tree,
            )
        sharding = NamedSharding(self.mesh, P())
        return jax.tree.map(
            lambda x: jax.make_array_from_callback(np.shape(x), sharding, _indexer(np.asarray(x))),
            tree,
        )

    def unreplicate(self, tree: PyTree) -> PyTree:
        """Device form -> one copy (on the first local device)."""
        if self.mode == "pmap":
            return jax.tree.map(lambda x: x.addressable_shards[0].data[0], tree)
        return jax.tree.map(lambda x: x.addressable_shards[0].data, tree)

    def shard(self, batch: np.ndarray) -> jax.Array:
        """A process-local batch [B, ...] (or views [2, B, ...]) -> the mapped step's input."""
        batch = np.asarray(batch)
        views = batch.ndim == 5 and batch.shape[0] == 2
        batch_axis = 1 if views else 0
        if batch.shape[batch_axis] % self.num_local:
            raise ValueError(
                f"this process's batch of {batch.shape[batch_axis]} does not split over its "
                f"{self.num_local} devices."
            )
        if self.mode == "pmap":
            per_device = batch.shape[batch_axis] // self.num_local
            if views:
                batch = batch.reshape(2, self.num_local, per_device, *batch.shape[2:]).swapaxes(
                    0, 1
                )
            else:
                batch = batch.reshape(self.num_local, per_device, *batch.shape[1:])
            return jax.device_put(batch, NamedSharding(self.mesh, P(self.axis_name)))
        spec = P(None, self.axis_name) if views else P(self.axis_name)
        return jax.make_array_from_process_local_data(NamedSharding(self.mesh, spec), batch)

    # ------------------------------------------------------------------------- mapping

    def map(self, fn: Callable, *, donate_state: bool = True) -> Callable:
        """Map ``fn(state, images, key[, labels]) -> (state, metrics)`` over the devices.

        The state goes in and out in device form; images (and labels) come from ``shard``;
        the key is one key shared by all replicas. With ``donate_state`` the old state's
        buffers are reused.
        """
        donate = (0,) if donate_state else ()

        def call(state, images, key, labels=None):
            views = images.ndim == (6 if self.mode == "pmap" else 5) and images.shape[-5] == 2
            cache_key = (fn, views, labels is not None, donate)
            if cache_key not in self._compiled:
                self._compiled[cache_key] = self.mapped(fn, views, labels is not None, donate)
            args = (state, images, key) if labels is None else (state, images, key, labels)
            return self._compiled[cache_key](*args)

        return call

    def mapped(self, fn, views=False, with_labels=False, donate=(0,)):
        """The jax.pmap / jit(shard_map) of ``fn`` itself (``map`` caches these), e.g. to
        ``.lower(...).compile()`` ahead of time and read XLA's cost analysis."""
        if self.mode == "pmap":
            in_axes = (0, 0, None, 0) if with_labels else (0, 0, None)
            return jax.pmap(fn, axis_name=self.axis_name, in_axes=in_axes, donate_argnums=donate)
        image_spec = P(None, self.axis_name) if views else P(self.axis_name)
        in_specs = (P(), image_spec, P()) + ((P(self.axis_name),) if with_labels else ())
        mapped = _shard_map(fn, self.mesh, in_specs, (P(), P()))
        return jax.jit(mapped, donate_argnums=donate)

    def fetch(self, metrics: PyTree) -> dict:
        """Device metrics (identical on all replicas) -> host Python floats."""
        metrics = self.unreplicate(metrics)
        return {k: float(v) for k, v in jax.device_get(metrics).items()}


def prefetch_to_device(batches: Iterable[PyTree], replicas: Replicas, size: int = 2) -> Iterator:
    """Shard host batches onto the devices ``size`` batches ahead: ``device_put`` is
    asynchronous, so the copies overlap the running step and the device never waits."""
    queue = collections.deque()
    iterator = iter(batches)

    def enqueue(n):
        for batch in itertools.islice(iterator, n):
            queue.append(jax.tree.map(replicas.shard, batch))

    enqueue(size)
    while queue:
        yield queue.popleft()
        enqueue(1)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Join a multi-process JAX cluster (a TPU pod, several GPU hosts, or CPU processes on
    one machine). With no arguments, JAX detects the cluster (TPU pods, SLURM, ...). On the
    CPU backend, collectives go through gloo. Must run before any other JAX call."""
    if (os.environ.get("JAX_PLATFORMS") or "").startswith("cpu") or not _has_accelerator_env():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )


def _has_accelerator_env() -> bool:
    return any(os.environ.get(k) for k in ("TPU_NAME", "CUDA_VISIBLE_DEVICES", "TPU_WORKER_ID"))


def _indexer(x: np.ndarray) -> Callable:
    return lambda index: x[index]


def bound_axis(name: str | None) -> str | None:
    """``name`` if the code runs under a pmap/shard_map that binds that axis, else None: what
    lets one per-replica function run unmapped, under pmap and under shard_map alike."""
    if name is None:
        return None
    try:
        jax.lax.axis_size(name)
    except NameError:
        return None
    return name
