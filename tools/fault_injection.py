"""Crash survival, measured: SIGKILL a tiny BYOL run at random moments until it completes.

    python tools/fault_injection.py --kills 30 --total_steps 200 --workdir /tmp/byol_faults

A tiny model (the quickstart config shrunk) trains in a subprocess of
``python -m byol_jax.train``. Each life is killed with SIGKILL at one of three moments:

* ``launch``: a random delay after the start (imports, compilation, restore);
* ``training``: a random delay after the life wrote its first metrics line;
* ``checkpoint``: the instant the life's 1st, 2nd or 3rd orbax write is in flight (a
  ``*.orbax-checkpoint-tmp*`` directory exists in ``workdir/checkpoints``).

After every kill each checkpoint left on disk must restore, checksums included; the next life
must resume from the newest of them. The finished run must end at the same step with a
state (online and target parameters, BatchNorm statistics, optimiser state) bit-identical to
an uninterrupted run's. Prints ``kills survived: K / N``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import helpers  # noqa: E402 (the tests' config and subprocess helpers)

MOMENTS = ("launch", "training", "checkpoint")
FIXED = {"batch_size": 16, "knn_at_end": False, "log_every": 1}
TINY = (*helpers.TINY_FLAGS, *(f"--config.{k}={v}" for k, v in FIXED.items()))
_RESUMED = re.compile(r"Resuming from the checkpoint of step (\d+)")


@dataclasses.dataclass
class Life:
    """One start of the training program and how it ended."""

    moment: str  # 'launch', 'training', 'checkpoint' or 'finish'
    killed: bool  # SIGKILL reached a running process
    returncode: int
    resumed_from: int | None  # the step its stderr says it resumed from
    steps_on_disk: list[int]  # restorable checkpoints after it ended
    survived: bool  # the next start sees a consistent directory (see `check_directory`)
    in_flight: list[str] = dataclasses.field(default_factory=list)  # tmp writes the kill cut
    damaged: dict[int, str] = dataclasses.field(default_factory=dict)  # unrestorable steps
    note: str = ""


# ------------------------------------------------------------------------------ processes


def train_env(devices: int = 8) -> dict[str, str]:
    return helpers.subprocess_env(devices)


def train_command(
    workdir, total_steps: int, checkpoint_every: int, *extra: str, config_file=None
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "byol_jax.train",
        "--config",
        str(config_file or REPO / "configs" / "quickstart.py"),
        "--workdir",
        str(workdir),
        *TINY,
        f"--config.total_steps={total_steps}",
        f"--config.checkpoint_every={checkpoint_every}",
        *extra,
    ]


def tmp_checkpoints(workdir) -> list[str]:
    """Names of orbax writes in flight (or left by a kill) in ``workdir/checkpoints``."""
    try:
        return [
            e.name for e in os.scandir(pathlib.Path(workdir) / "checkpoints") if "tmp" in e.name
        ]
    except FileNotFoundError:
        return []


def _metric_lines(workdir) -> int:
    try:
        return (pathlib.Path(workdir) / "metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _wait_for(process, condition, timeout: float, poll: float) -> bool:
    """Polls `condition` until it holds (True) or the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if condition():
            return True
        time.sleep(poll)
    return False


def run_and_kill(
    command, env, workdir, moment: str, rng: random.Random, launch_window: float, window=2.0
):
    """Starts one life and SIGKILLs it at `moment`; returns (killed, returncode, stderr)."""
    log_path = pathlib.Path(workdir).parent / f"{pathlib.Path(workdir).name}.life.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        lines = _metric_lines(workdir)
        if moment == "launch":  # a random moment before this life's first step
            _wait_for(
                process, lambda: _metric_lines(workdir) > lines, rng.uniform(0, launch_window), 0.01
            )
        elif moment == "training":
            if _wait_for(process, lambda: _metric_lines(workdir) > lines, 300, 0.02):
                _wait_for(process, lambda: False, rng.uniform(0.0, window), 0.01)
        else:  # 'checkpoint': while the n-th write of this life is in flight (n in 1..3)
            leftover, seen, wanted = set(tmp_checkpoints(workdir)), set(), rng.randint(1, 3)

            def nth_write_in_flight():
                now = set(tmp_checkpoints(workdir))
                leftover.intersection_update(now)  # a killed life's write, until it is deleted
                seen.update(now - leftover)
                return len(seen) >= wanted and bool(now - leftover)

            _wait_for(process, nth_write_in_flight, 300, 0.001)
        killed = process.poll() is None
        if killed:
            process.send_signal(signal.SIGKILL)
        returncode = process.wait()
    return killed, returncode, log_path.read_text()


# ------------------------------------------------------------------------------ checking


def load_config(total_steps: int, checkpoint_every: int, config_file=None):
    """The quickstart config (or `config_file`) as ``train_command`` overrides it."""
    return helpers.load_config(
        config_file or "quickstart",
        ("total_steps", total_steps),
        ("checkpoint_every", checkpoint_every),
        *FIXED.items(),
    )


def template_state(config, scratch):
    """A host copy of the initial training state: the restore target of every checkpoint."""
    import jax  # noqa: PLC0415 (the tool's subprocesses must not wait for this import)
    import numpy as np  # noqa: PLC0415

    from byol_jax.programs import pretraining  # noqa: PLC0415

    run = pretraining.setup(config, str(scratch))
    images = np.zeros((2, config.image_size, config.image_size, 3), np.uint8)
    return jax.device_get(run.learner.init(jax.random.key(config.seed), images, run.tx))


def restore_all(workdir, template) -> dict[int, object]:
    """{step: state} for every checkpoint in ``workdir/checkpoints``; a damaged one raises
    ``checkpoint.DamagedCheckpointError`` (checksums are verified)."""
    from byol_jax import checkpoint  # noqa: PLC0415

    directory = pathlib.Path(workdir) / "checkpoints"
    if not directory.exists():
        return {}
    with checkpoint.Checkpointer(directory, read_only=True) as reader:
        return {step: reader.restore(step, template) for step in reader.all_steps()}


def bit_identical(a, b) -> list[str]:
    """Names of the leaves where two states differ in any bit (empty: identical)."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree.leaves(b)
    if len(flat_a) != len(flat_b):
        return [f"{len(flat_a)} leaves vs {len(flat_b)}"]
    return [
        jax.tree_util.keystr(path)
        for (path, x), y in zip(flat_a, flat_b, strict=True)
        if np.asarray(x).dtype != np.asarray(y).dtype
        or np.asarray(x).tobytes() != np.asarray(y).tobytes()
    ]


# ------------------------------------------------------------------------------ experiment


@dataclasses.dataclass
class Report:
    lives: list[Life]
    final_step: int | None
    expected_step: int
    differing_leaves: list[str]
    seconds: float

    @property
    def kills(self) -> int:
        return sum(life.killed for life in self.lives)

    @property
    def survived(self) -> int:
        return sum(life.killed and life.survived for life in self.lives)

    @property
    def cut_writes(self) -> int:
        return sum(bool(life.in_flight) for life in self.lives if life.killed)

    @property
    def left_damaged(self) -> int:
        return sum(bool(life.damaged) for life in self.lives if life.killed)

    @property
    def ok(self) -> bool:
        finished = self.lives and self.lives[-1].returncode == 0
        return bool(
            finished
            and self.survived == self.kills
            and self.final_step == self.expected_step
            and not self.differing_leaves
        )

    def summary(self) -> str:
        moments = {m: sum(1 for x in self.lives if x.killed and x.moment == m) for m in MOMENTS}
        return "\n".join(
            [
                f"kills survived: {self.survived} / {self.kills} "
                f"(at launch {moments['launch']}, training {moments['training']}, "
                f"checkpoint write {moments['checkpoint']}); {len(self.lives)} starts, "
                f"{self.cut_writes} kills cut a write, {self.left_damaged} left an older step "
                "unrestorable (never read: a newer one was good), "
                f"{self.seconds:.0f} s",
                f"final step: {self.final_step} (expected {self.expected_step}); "
                f"bit-identical to the uninterrupted run: "
                f"{'yes' if not self.differing_leaves else 'NO: ' + str(self.differing_leaves[:5])}",
            ]
        )


def restore_each(workdir, template) -> tuple[dict[int, object], dict[int, str]]:
    """({step: state} of the checkpoints that restore with their checksums, {step: why not}
    for the others)."""
    from byol_jax import checkpoint  # noqa: PLC0415

    directory = pathlib.Path(workdir) / "checkpoints"
    if not directory.exists():
        return {}, {}
    good, damaged = {}, {}
    with checkpoint.Checkpointer(directory, read_only=True) as reader:
        for step in reader.all_steps():
            try:
                good[step] = reader.restore(step, template)
            except checkpoint.CheckpointError as error:
                damaged[step] = str(error)[:300]
    return good, damaged


def check_directory(workdir, template, resumed_from, expected_resume):
    """After a life ended: (survived, restorable steps, damaged steps, note). Survived: the
    newest checkpoint restores (the next start resumes from it) and this life resumed from
    the newest one the previous life left. Older damaged steps are reported, not fatal: the
    next start never reads them while a newer one is good."""
    states, damaged = restore_each(workdir, template)
    good = sorted(states)
    newest_damaged = damaged and (not good or max(damaged) > max(good))
    if newest_damaged:
        return False, good, damaged, f"newest checkpoint damaged: {damaged}"
    if resumed_from is not None and resumed_from != expected_resume:
        note = f"resumed from {resumed_from}, the newest checkpoint was {expected_resume}"
        return False, good, damaged, note
    return True, good, damaged, f"older damaged: {damaged}" if damaged else ""


def reference_run(
    workdir, total_steps, checkpoint_every, env, config_file=None
) -> tuple[float, float]:
    """The uninterrupted run; returns (seconds to its first metrics line, total seconds)."""
    shutil.rmtree(workdir, ignore_errors=True)
    start = time.monotonic()
    command = train_command(workdir, total_steps, checkpoint_every, config_file=config_file)
    with open(f"{workdir}.log", "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        _wait_for(process, lambda: _metric_lines(workdir) > 0, 600, 0.05)
        first = time.monotonic() - start
        if process.wait() != 0:
            raise RuntimeError(f"the uninterrupted run failed; see {workdir}.log")
    return first, time.monotonic() - start


def inject_faults(
    root,
    *,
    kills: int,
    total_steps: int,
    checkpoint_every: int = 1,
    seed: int = 0,
    devices: int = 8,
    moments: tuple[str, ...] = MOMENTS,
    straight=None,
    config_file=None,
    training_window: float = 2.0,
    verbose: bool = True,
) -> Report:
    """Runs the experiment in `root/killed`, against the uninterrupted run in `straight`
    (default: run one in `root/straight`) of the same `total_steps`, `checkpoint_every` and
    `config_file` (default: a copy of configs/quickstart.py, so edits meanwhile change nothing).
    'training' kills land up to `training_window` seconds after a life's first step."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    env, rng = train_env(devices), random.Random(seed)
    start = time.monotonic()
    # Every life of one experiment reads the same config, even if configs/ is edited meanwhile.
    if config_file is None:
        config_file = root / "config.py"
        shutil.copy(REPO / "configs" / "quickstart.py", config_file)
    first_metric = 10.0  # seconds to the first step: the window of 'launch' kills
    if straight is None:
        straight = root / "straight"
        first_metric, _ = reference_run(straight, total_steps, checkpoint_every, env, config_file)
    config = load_config(total_steps, checkpoint_every, config_file)
    template = template_state(config, root / "scratch")
    workdir = root / "killed"
    shutil.rmtree(workdir, ignore_errors=True)
    command = train_command(workdir, total_steps, checkpoint_every, config_file=config_file)
    lives: list[Life] = []
    newest = None  # the newest restorable checkpoint before the next start
    while sum(life.killed for life in lives) < kills:
        moment = moments[len(lives) % len(moments)]
        killed, rc, log = run_and_kill(
            command, env, workdir, moment, rng, 0.8 * first_metric, training_window
        )
        resumed = _RESUMED.search(log)
        resumed_from = int(resumed.group(1)) if resumed else None
        survived, steps, damaged, note = check_directory(workdir, template, resumed_from, newest)
        if not killed and rc != 0:
            survived, note = False, f"exit {rc}: {log[-500:]}"
        in_flight = tmp_checkpoints(workdir) if killed else []
        lives.append(
            Life(moment, killed, rc, resumed_from, steps, survived, in_flight, damaged, note)
        )
        if verbose:
            print(
                f"  {moment:10s} killed={killed} rc={rc} resumed_from={resumed_from} "
                f"on_disk={steps[-3:]} cut_writes={in_flight} {note}",
                flush=True,
            )
        newest = steps[-1] if steps else None
        if not killed or not survived:
            break  # the run finished (or broke) before the next kill
    if not lives or lives[-1].killed:
        rc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
        resumed = _RESUMED.search(rc.stderr)
        resumed_from = int(resumed.group(1)) if resumed else None
        survived, steps, damaged, note = check_directory(workdir, template, resumed_from, newest)
        if rc.returncode != 0:
            survived, note = False, rc.stderr[-500:]
        lives.append(Life("finish", False, rc.returncode, resumed_from, steps, survived, note=note))
    straight = restore_all(straight, template)
    final, _ = restore_each(workdir, template)
    final_step = max(final) if final else None
    differing = (
        bit_identical(straight[total_steps], final[final_step])
        if final_step == total_steps
        else ["(no final checkpoint)"]
    )
    return Report(lives, final_step, total_steps, differing, time.monotonic() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--total_steps", type=int, default=200)
    parser.add_argument("--checkpoint_every", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--workdir", default="/tmp/byol_fault_injection")
    args = parser.parse_args(argv)
    report = inject_faults(
        args.workdir,
        kills=args.kills,
        total_steps=args.total_steps,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        devices=args.devices,
    )
    print(report.summary(), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
