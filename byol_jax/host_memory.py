"""Host memory on the CPU: XLA's freed temporaries kept for the next step, not unmapped.

Each call of a compiled step on XLA's CPU backend takes its temporaries in one block and
frees it when the call ends (497 MB for ResNet-18 of base width 16, 32 px, batch 128, both
views in one batch: the step the README compares with byol-pytorch). glibc serves a block
that large from a fresh ``mmap`` and returns it with ``munmap``, so on every step the kernel
maps and zeroes the whole block again, a page at a time: 121,000 page faults and about
250 ms of system time per step on the development machine (2 cores), 15 % of the step's CPU
time. Keeping it made that step 1.06x faster there (``benchmarks/host_memory.py``).

``keep_freed_memory()`` makes glibc serve every allocation from its main heap (one arena for
all threads, no ``mmap`` for large blocks) and never give freed heap back to the system, so
the next step reuses pages that are already mapped. The settings are process-wide and only
reach threads that have not allocated yet: call it before the first JAX computation (before
JAX starts its CPU backend's threads). The process's memory then stays at its peak, and the
heap grows while freed blocks are split by smaller ones before it holds: for ResNet-18 at
base width 64 (1,965 MB of temporaries) 7.2 GB resident after 5 steps and steady after,
against 3.9 GB without the setting; at width 16, 2.9 GB against 2.1 GB.

The training entry points call ``configure_for_run()`` first: it keeps freed memory when the
run computes on the CPU (``cpu_only()``) and leaves malloc alone on GPU and TPU hosts, where
the temporaries live in device memory and one arena could serialise the input pipeline's
threads (not measured: the development machine has 2 cores). ``BYOL_JAX_KEEP_HOST_MEMORY=1``
or ``=0`` overrides that choice. A notebook on the CPU calls ``keep_freed_memory()`` itself,
first thing. Outside glibc (macOS, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import platform

ENV = "BYOL_JAX_KEEP_HOST_MEMORY"
# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# Device nodes of NVIDIA and AMD GPUs and of Cloud TPUs (/dev/accel*, or vfio on newer VMs).
_ACCELERATOR_NODES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def keep_freed_memory() -> bool:
    """Every allocation from glibc's main heap, and freed heap kept for reuse (see the module
    docstring). Returns whether the settings took effect (False outside glibc)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    # A trim threshold of -1 turns trimming off (mallopt(3)); 2**31 - 1, the largest positive
    # value, still gave a step's temporaries back whenever they passed 2 GiB (base width 64).
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)


def cpu_only() -> bool:
    """Whether JAX will compute on the CPU, decided without starting it: ``JAX_PLATFORMS``
    when set (its first platform), else whether no GPU or TPU device node exists."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not any(glob.glob(pattern) for pattern in _ACCELERATOR_NODES)


def configure_for_run() -> bool:
    """``keep_freed_memory()`` on a CPU run, unless ``BYOL_JAX_KEEP_HOST_MEMORY`` says
    otherwise ('1': always, '0': never). Returns whether freed memory is now kept, and says
    so in the ``byol_jax`` log."""
    choice = os.environ.get(ENV, "").strip()
    if choice not in ("", "0", "1"):
        raise ValueError(
            f"{ENV} must be 1 (keep freed host memory), 0 (leave malloc alone) or unset "
            f"(keep it when the run is on the CPU), got {choice!r}."
        )
    if choice == "0" or (not choice and not cpu_only()):
        return False
    kept = keep_freed_memory()
    if kept:
        logging.getLogger("byol_jax").info(
            "host memory: freed memory kept for reuse (byol_jax.host_memory; %s=0 turns it off)",
            ENV,
        )
    return kept
