"""byol_jax.host_memory: freed host memory kept for reuse on CPU runs, and when it is not.

The malloc settings are process-wide, so the page-fault checks run in child processes."""

import platform
import subprocess
import sys

import pytest

from byol_jax import host_memory

# A child that mallocs, fills and frees a block of argv[2] MiB argv[3] times, each from a fresh
# thread (as XLA's worker threads take each step's temporaries) and prints the page faults of
# all rounds but the first. glibc serves a block over 64 MB from a worker's own arena with a
# new mmap.
_CHILD = """
import ctypes, resource, sys, threading
from byol_jax import host_memory
kept = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL(None)
libc.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages whatever the kernel's THP mode
libc.malloc.restype = ctypes.c_void_p
faults = []
def round_():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    size = int(sys.argv[2]) * 2**20
    block = libc.malloc(ctypes.c_size_t(size))
    assert block, "malloc failed"
    ctypes.memset(block, 1, size)
    libc.free(ctypes.c_void_p(block))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
for _ in range(int(sys.argv[3])):
    thread = threading.Thread(target=round_)
    thread.start()
    thread.join()
print(kept, sum(faults[1:]))
"""

GLIBC = platform.libc_ver()[0] == "glibc"


def _faults(mode: str, mib: int = 96, rounds: int = 4) -> tuple[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(mib), str(rounds)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    kept, faults = done.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(not GLIBC, reason="keep_freed_memory changes glibc's malloc only")
def test_kept_memory_is_reused_without_page_faults():
    pages = 3 * 96 * 2**20 // 4096  # what three fresh 96 MB blocks cost in 4 KiB pages
    kept, faults = _faults("keep")
    assert kept == "True"
    assert faults < 0.05 * pages, f"{faults} page faults for blocks that should be reused"
    # Without it every round maps and faults the block in again: the test can tell.
    kept, faults = _faults("system")
    assert kept == "False"
    assert faults > 0.9 * pages, f"only {faults} page faults: glibc kept the block anyway"


@pytest.mark.skipif(not GLIBC, reason="keep_freed_memory changes glibc's malloc only")
def test_kept_memory_holds_blocks_over_2_gib():
    # A step's temporaries pass 2 GiB at base width 64 (1,965 MB, plus the rest of the heap):
    # a trim threshold of 2**31 - 1 bytes, the largest positive one, gave them back to the
    # system after every step. -1 turns trimming off.
    mib = 2304
    kept, faults = _faults("keep", mib=mib, rounds=2)
    assert kept == "True"
    assert faults < 0.05 * mib * 2**20 // 4096, f"{faults} page faults: the block was trimmed"


def test_cpu_only_follows_jax_platforms_first(monkeypatch):
    monkeypatch.setattr(host_memory.glob, "glob", lambda pattern: [])
    for platforms, expected in (("cpu", True), ("CPU", True), ("tpu,cpu", False), ("cuda", False)):
        monkeypatch.setenv("JAX_PLATFORMS", platforms)
        assert host_memory.cpu_only() is expected, platforms


def test_cpu_only_sees_accelerator_device_nodes(monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(host_memory.glob, "glob", lambda pattern: [])
    assert host_memory.cpu_only()
    nodes = {"/dev/accel[0-9]*": ["/dev/accel0"]}
    monkeypatch.setattr(host_memory.glob, "glob", lambda pattern: nodes.get(pattern, []))
    assert not host_memory.cpu_only()


def test_configure_for_run_obeys_the_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(host_memory, "cpu_only", lambda: False)
    monkeypatch.delenv(host_memory.ENV, raising=False)
    assert not host_memory.configure_for_run()  # an accelerator host: malloc left alone
    monkeypatch.setenv(host_memory.ENV, "1")
    assert host_memory.configure_for_run()
    monkeypatch.setattr(host_memory, "cpu_only", lambda: True)
    monkeypatch.setenv(host_memory.ENV, "0")
    assert not host_memory.configure_for_run()
    assert calls == [1]
    monkeypatch.setenv(host_memory.ENV, "yes")
    with pytest.raises(ValueError, match="must be 1 .* 0 .* or unset"):
        host_memory.configure_for_run()
