"""What the accelerators byol_jax reports on can hold and compute: memory and dense bf16 peak
per JAX device, from the vendors' published figures (docs/results.md#reference-points-for-
speed). Used to print MFU and to say whether a compiled step fits; never measured here.

TPU v4 topologies list each of a chip's two TensorCores as a device, so a v4 device has half
the chip's 32 GiB and half its 275 TFLOP/s; v5e, v5p and v6e have one TensorCore per chip.
"""

from __future__ import annotations

import dataclasses

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Device:
    name: str  # what users call it
    memory_bytes: int  # HBM per JAX device
    bf16_flops: float  # dense bf16 peak per JAX device, FLOP/s (vendor figure)


# Keyed by jax's device_kind.
DEVICES = {
    "TPU v4": Device("TPU v4 (one TensorCore)", 16 * GIB, 137.5e12),
    "TPU v5 lite": Device("TPU v5e", 16 * GIB, 197e12),
    "TPU v5": Device("TPU v5p", 95 * GIB, 459e12),
    "TPU v6 lite": Device("TPU v6e (Trillium)", 32 * GIB, 918e12),
    "NVIDIA H100": Device("NVIDIA H100 SXM", 80 * GIB, 989e12),
    "NVIDIA H200": Device("NVIDIA H200", 141 * GIB, 989e12),
    "NVIDIA A100": Device("NVIDIA A100", 80 * GIB, 312e12),
}


def device_facts(device_kind: str) -> Device | None:
    """The facts of a device kind ('TPU v5 lite', 'NVIDIA H200 ...'), None when unknown."""
    if device_kind in DEVICES:
        return DEVICES[device_kind]
    matches = [k for k in DEVICES if device_kind.startswith(k)]
    return DEVICES[max(matches, key=len)] if matches else None
