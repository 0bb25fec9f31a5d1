"""Compile the pre-training step ahead of time for a TPU topology, on any host, and report
what it needs: ``compile_for_topology(config, 'v5e:16x16')``.

libtpu (``pip install -e ".[tpu]"``) lets XLA compile for TPU topologies without a TPU:
``jax.experimental.topologies`` gives the topology's abstract devices, the step is built by
the trainer's own builders (``byol_jax.builders``) for the 'tpu' backend, mapped with the
trainer's ``shard_map`` (``byol_jax.parallel.Replicas``) over all of the topology's chips,
lowered with abstract inputs of the config's global batch and compiled. XLA's memory and
cost analyses of that executable give the figures: memory per device against its HBM, FLOPs
per step and per image, and the images/s a chip's peak bf16 rate would allow at a stated
utilisation (an estimate: MFU is not measured without a TPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from byol_jax import builders, byol, hardware, parallel
from byol_jax.data import ordering

INSTALL = 'pip install -e ".[tpu]" (or pip install "jax[tpu]")'


class TopologyError(ValueError):
    """The topology cannot be compiled for (unknown, no libtpu, batch does not split)."""


@dataclasses.dataclass
class Report:
    """What the compiled step needs, per device (a TPU TensorCore) unless said otherwise."""

    topology: str
    device_kind: str
    devices: int
    processes: int
    devices_per_process: int
    global_batch: int
    batch_per_device: int
    batch_per_process: int
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    memory_bytes: int | None  # the device's HBM (vendor figure), None when unknown
    flops_per_step_per_device: float
    compile_s: float
    peak_flops: float | None  # dense bf16, per device (vendor figure)

    @property
    def used_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes + self.temp_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.memory_bytes is None else self.used_bytes <= self.memory_bytes

    @property
    def flops_per_image(self) -> float:
        return self.flops_per_step_per_device * self.devices / self.global_batch

    def images_per_s(self, utilisation: float) -> float | None:
        """What the devices' peak would allow at ``utilisation`` (an estimate, not a measure)."""
        if self.peak_flops is None:
            return None
        return utilisation * self.peak_flops * self.devices / self.flops_per_image

    def batch_that_fits(self) -> int | None:
        """An estimate of the largest batch per device that fits, temporaries scaling with
        the batch (arguments and outputs do not): None when it already fits or is unknown."""
        if self.fits is not False:
            return None
        room = self.memory_bytes - self.argument_bytes - self.output_bytes
        return max(0, math.floor(self.batch_per_device * room / max(self.temp_bytes, 1)))


def topology_devices(name: str) -> list:
    """The abstract devices of a TPU topology ('v5e:2x2', 'v4:4x4x4', ...)."""
    from jax.experimental import topologies  # noqa: PLC0415

    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except Exception as error:  # libtpu missing, or a name it does not know
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "tpu" in text.lower() and (
            "not found" in text.lower() or "unknown backend" in text.lower()
        ):
            raise TopologyError(f"cannot compile for TPU: libtpu is not installed ({text}). Install it with {INSTALL}.") from error  # fmt: skip
        if "lockfile" in text:
            raise TopologyError(
                f"libtpu is in use by another process ({text}). Without a TPU on this host "
                "(compiling only), allow it: ALLOW_MULTIPLE_LIBTPU_LOAD=1 python -m byol_jax.aot ..."
            ) from error
        raise TopologyError(
            f"cannot describe the TPU topology {name!r} ({text}). Name one libtpu knows, as "
            "GENERATION:SHAPE, e.g. v4:2x2x1, v5e:2x2, v5e:16x16, v5p:4x4x8, v6e:2x2."
        ) from error


def check_layout(global_batch: int, devices: list, topology: str) -> tuple[int, int, int]:
    """(processes, batch per device, batch per process); a TopologyError before compiling
    when the global batch does not split over the devices."""
    if global_batch % len(devices):
        fit = max(1, global_batch // len(devices)) * len(devices)
        raise TopologyError(
            f"batch_size={global_batch} does not split over the {len(devices)} devices of "
            f"{topology}: use a multiple of {len(devices)} (e.g. {fit})."
        )
    processes = len({d.process_index for d in devices})
    # The input pipeline's share per host must be what the host's devices take.
    per_process = ordering.per_process_batch(global_batch, processes)
    return processes, global_batch // len(devices), per_process


def compile_for_topology(
    config: ml_collections.ConfigDict, topology: str, num_classes: int | None = None
) -> tuple[Report, object]:
    """Builds the trainer's step for ``topology`` and compiles it: (report, executable)."""
    builders.check_config(config)
    devices = topology_devices(topology)
    return compile_for_devices(config, devices, num_classes, "tpu", topology)


def compile_for_devices(config, devices, num_classes, backend, name) -> tuple[Report, object]:
    """The trainer's step built for ``backend`` and compiled for ``devices`` (abstract TPU
    devices, or this host's own: the same report for a CPU compilation to compare with)."""
    processes, per_device, per_process = check_layout(config.batch_size, devices, name)
    learner, tx = _learner_and_optimizer(config, num_classes, backend)
    replicas = parallel.Replicas("shard_map", byol.DEFAULT_AXIS, devices=devices)
    args = _abstract_inputs(config, learner, tx, replicas.mesh)
    step = replicas.mapped(learner.train_step, config.data.host_crop, learner.num_classes is not None)  # fmt: skip
    start = time.perf_counter()
    with _no_persistent_cache(backend != jax.default_backend()):
        compiled = step.lower(*args).compile()
    seconds = time.perf_counter() - start
    memory, cost = compiled.memory_analysis(), _cost(compiled)
    facts = hardware.device_facts(devices[0].device_kind)
    report = Report(
        topology=name,
        device_kind=devices[0].device_kind,
        devices=len(devices),
        processes=processes,
        devices_per_process=len(devices) // processes,
        global_batch=config.batch_size,
        batch_per_device=per_device,
        batch_per_process=per_process,
        argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
        memory_bytes=facts.memory_bytes if facts else None,
        flops_per_step_per_device=float(cost.get("flops", 0.0)),
        compile_s=seconds,
        peak_flops=facts.bf16_flops if facts else None,
    )
    return report, compiled


def _learner_and_optimizer(config, num_classes, backend):
    """The trainer's learner and optimiser, built for ``backend``. The schedules' lengths
    change values, not the compiled program: without the data's size, an epoch is taken as
    1,000 steps, and a warm-up that would not fit is given as a tenth of the run."""
    config = config.copy_and_resolve_references()
    steps_per_epoch = 1000
    total_steps = (
        config.total_steps if config.total_steps > 0 else config.num_epochs * steps_per_epoch
    )
    if config.warmup_fraction is None and config.warmup_epochs * steps_per_epoch >= total_steps:
        config.warmup_fraction = 0.1
    learner = builders.build_learner(config, total_steps, num_classes, backend=backend)
    return learner, builders.build_optimizer(config, total_steps, steps_per_epoch)


def _abstract_inputs(config, learner, tx, mesh):
    """(state, images, key[, labels]) as ShapeDtypeStructs on the mesh, nothing allocated."""
    size = config.image_size
    replicated = NamedSharding(mesh, P())
    sample = builders.sample_images(config)
    state = jax.eval_shape(lambda key: learner.init(key, sample, tx), jax.random.key(0))
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)  # fmt: skip
    batch = config.batch_size
    if config.data.host_crop:  # two host-cropped views per image
        images = jax.ShapeDtypeStruct((2, batch, size, size, 3), jnp.uint8, sharding=NamedSharding(mesh, P(None, "batch")))  # fmt: skip
    else:
        images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8, sharding=NamedSharding(mesh, P("batch")))  # fmt: skip
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
    if learner.num_classes is None:
        return state, images, key
    labels = jax.ShapeDtypeStruct((batch,), np.int32, sharding=NamedSharding(mesh, P("batch")))
    return state, images, key, labels


@contextlib.contextmanager
def _no_persistent_cache(off: bool):
    """Keeps an executable for another platform out of JAX's persistent compilation cache:
    this host could not load it back (JAX warns and recompiles)."""
    enabled = jax.config.jax_enable_compilation_cache
    if off:
        jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    return cost[0] if isinstance(cost, list | tuple) else (cost or {})


def num_classes(config: ml_collections.ConfigDict, given: int | None = None) -> int | None:
    """The online probe's classes without reading data: ``given``, else the dataset's (a TFDS
    dataset's metadata, or the source's facts), None without a probe or labels."""
    if not config.online_probe:
        return None
    if given is not None:
        return given or None
    if config.data.source == "tfds":
        import tensorflow_datasets as tfds  # noqa: PLC0415 (metadata only: nothing is read)

        features = tfds.builder(config.data.name).info.features
        label = features[config.data.label_key] if config.data.label_key in features else None
        return getattr(label, "num_classes", None)
    from byol_jax import data  # noqa: PLC0415

    return data.dataset_info(config.data).get("num_classes")


def as_dict(report: Report, utilisation: float) -> dict:
    """The report as JSON values, with the derived figures."""
    return {
        **dataclasses.asdict(report),
        "used_bytes": report.used_bytes,
        "fits": report.fits,
        "flops_per_image": report.flops_per_image,
        "utilisation": utilisation,
        "images_per_s_estimate": report.images_per_s(utilisation),
        "batch_per_device_that_fits_estimate": report.batch_that_fits(),
    }


def describe(report: Report, utilisation: float) -> str:
    """The lines ``python -m byol_jax.aot`` prints."""
    gib = lambda n: f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"  # noqa: E731
    r = report
    lines = [
        f"{r.topology}: {r.devices} devices ({r.device_kind}), {r.processes} processes x "
        f"{r.devices_per_process} devices; global batch {r.global_batch} = {r.batch_per_device} "
        f"per device, {r.batch_per_process} per process (the input pipeline's share)",
        f"compiled in {r.compile_s:.1f} s",
        f"memory per device: arguments {gib(r.argument_bytes)}, outputs {gib(r.output_bytes)}, "
        f"temporaries {gib(r.temp_bytes)}; total {gib(r.used_bytes)}"
        + (f" of {gib(r.memory_bytes)} HBM" if r.memory_bytes else " (HBM unknown)"),
        f"FLOPs: {r.flops_per_step_per_device / 1e9:,.1f} GFLOP per device per step, "
        f"{r.flops_per_image / 1e9:.2f} GFLOP per image",
    ]
    if r.fits is False:
        lines.append(
            f"DOES NOT FIT: {gib(r.used_bytes)} > {gib(r.memory_bytes)}; about "
            f"{r.batch_that_fits()} images per device would (an estimate: temporaries scale "
            "with the batch)"
        )
    rate = r.images_per_s(utilisation)
    if rate is not None:
        lines.append(
            f"at {100 * utilisation:.0f} % of the devices' peak bf16 rate ({r.peak_flops / 1e12:.0f} "
            f"TFLOP/s each, vendor figure): about {rate:,.0f} images/s (an estimate, not measured)"
        )
    return "\n".join(lines)
