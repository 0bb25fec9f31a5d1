"""Crash survival, measured: SIGKILL a tiny BYOL run at random moments until it completes.

    python tools/fault_injection.py --kills 30 --total_steps 200 --workdir /tmp/byol_faults

A tiny model (the quickstart config shrunk) trains in a subprocess of
``python -m byol_jax.train``. Each life is killed with SIGKILL at one of three moments:

* ``launch``: a random delay after the start (imports, compilation, restore);
* ``training``: a random delay after the life wrote its first metrics line;
* ``checkpoint``: the instant an orbax write is in flight (a ``*.orbax-checkpoint-tmp*``
  directory exists in ``workdir/checkpoints``).

After every kill each checkpoint left on disk must restore, checksums included; the next life
must resume from the newest of them. The finished run must end at the same step with a
state (online and target parameters, BatchNorm statistics, optimiser state) bit-identical to
an uninterrupted run's. Prints ``kills survived: K / N``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
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
MOMENTS = ("launch", "training", "checkpoint")
TINY = (
    "--config.encoder=tiny",
    "--config.projection_hidden_size=32",
    "--config.projection_size=16",
    "--config.batch_size=16",
    "--config.knn_at_end=False",
    "--config.progress_bar=False",
    "--config.log_every=1",
)
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
    note: str = ""


# ------------------------------------------------------------------------------ processes


def train_env(devices: int = 8) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(REPO / ".cache" / "jax")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def train_command(workdir, total_steps: int, checkpoint_every: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "byol_jax.train",
        "--config",
        str(REPO / "configs" / "quickstart.py"),
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
        return [e.name for e in os.scandir(pathlib.Path(workdir) / "checkpoints") if "tmp" in e.name]
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


def run_and_kill(command, env, workdir, moment: str, rng: random.Random, launch_window: float):
    """Starts one life and SIGKILLs it at `moment`; returns (killed, returncode, stderr)."""
    log_path = pathlib.Path(workdir).parent / f"{pathlib.Path(workdir).name}.life.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        lines = _metric_lines(workdir)
        if moment == "launch":
            _wait_for(process, lambda: False, rng.uniform(0.0, launch_window), 0.01)
        elif moment == "training":
            if _wait_for(process, lambda: _metric_lines(workdir) > lines, 300, 0.02):
                _wait_for(process, lambda: False, rng.uniform(0.0, 1.0), 0.01)
        else:  # 'checkpoint': the moment a new write is in flight (not a killed life's leftover)
            leftover = set(tmp_checkpoints(workdir))
            _wait_for(process, lambda: bool(set(tmp_checkpoints(workdir)) - leftover), 300, 0.001)
        killed = process.poll() is None
        if killed:
            process.send_signal(signal.SIGKILL)
        returncode = process.wait()
    return killed, returncode, log_path.read_text()


# ------------------------------------------------------------------------------ checking


def load_config(total_steps: int, checkpoint_every: int):
    """The quickstart config as ``train_command`` overrides it."""
    spec = importlib.util.spec_from_file_location("quickstart", REPO / "configs" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for flag in (*TINY, f"--config.total_steps={total_steps}"):
        name, value = flag.removeprefix("--config.").split("=")
        kind = type(config[name])
        config[name] = value == "True" if kind is bool else kind(value)
    config.checkpoint_every = checkpoint_every
    return config


def template_state(config, scratch):
    """A host copy of the initial training state: the restore target of every checkpoint."""
    import jax  # noqa: PLC0415 (the tool's subprocesses must not wait for this import)
    import numpy as np  # noqa: PLC0415

    from byol_jax import training  # noqa: PLC0415

    run = training.setup(config, str(scratch))
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
                f"{self.seconds:.0f} s",
                f"final step: {self.final_step} (expected {self.expected_step}); "
                f"bit-identical to the uninterrupted run: "
                f"{'yes' if not self.differing_leaves else 'NO: ' + str(self.differing_leaves[:5])}",
            ]
        )


def check_directory(workdir, template, resumed_from, expected_resume) -> tuple[bool, list, str]:
    """After a life ended: every checkpoint restores, and the life resumed where it should."""
    try:
        steps = sorted(restore_all(workdir, template))
    except Exception as error:  # a damaged or unreadable checkpoint: the kill was not survived
        return False, [], f"{type(error).__name__}: {str(error)[:300]}"
    if resumed_from is not None and resumed_from != expected_resume:
        return False, steps, f"resumed from {resumed_from}, the newest checkpoint was {expected_resume}"
    return True, steps, ""


def reference_run(workdir, total_steps, checkpoint_every, env) -> tuple[float, float]:
    """The uninterrupted run; returns (seconds to its first metrics line, total seconds)."""
    shutil.rmtree(workdir, ignore_errors=True)
    start = time.monotonic()
    command = train_command(workdir, total_steps, checkpoint_every)
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
    verbose: bool = True,
) -> Report:
    """Runs the experiment in `root` (``root/straight`` and ``root/killed``)."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    env, rng = train_env(devices), random.Random(seed)
    start = time.monotonic()
    first_metric, _ = reference_run(root / "straight", total_steps, checkpoint_every, env)
    config = load_config(total_steps, checkpoint_every)
    template = template_state(config, root / "scratch")
    workdir = root / "killed"
    shutil.rmtree(workdir, ignore_errors=True)
    command = train_command(workdir, total_steps, checkpoint_every)
    lives: list[Life] = []
    newest = None  # the newest restorable checkpoint before the next start
    while sum(life.killed for life in lives) < kills:
        moment = moments[len(lives) % len(moments)]
        killed, rc, log = run_and_kill(command, env, workdir, moment, rng, 1.2 * first_metric)
        resumed = _RESUMED.search(log)
        resumed_from = int(resumed.group(1)) if resumed else None
        survived, steps, note = check_directory(workdir, template, resumed_from, newest)
        if not killed and rc != 0:
            survived, note = False, f"exit {rc}: {log[-500:]}"
        lives.append(Life(moment, killed, rc, resumed_from, steps, survived, note))
        if verbose:
            print(f"  {moment:10s} killed={killed} rc={rc} resumed_from={resumed_from} "
                  f"on_disk={steps[-3:]} tmp={tmp_checkpoints(workdir)} {note}", flush=True)
        newest = steps[-1] if steps else None
        if not killed or not survived:
            break  # the run finished (or broke) before the next kill
    if not lives or lives[-1].killed:
        rc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
        resumed = _RESUMED.search(rc.stderr)
        resumed_from = int(resumed.group(1)) if resumed else None
        survived, steps, note = check_directory(workdir, template, resumed_from, newest)
        if rc.returncode != 0:
            survived, note = False, rc.stderr[-500:]
        lives.append(Life("finish", False, rc.returncode, resumed_from, steps, survived, note))
    straight = restore_all(root / "straight", template)
    final = restore_all(workdir, template)
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
