"""The one training loop (byol_jax.loop) with a fake step: what it logs, saves and raises."""

import itertools
import math

import pytest

from byol_jax import lifecycle, loop


class Saver:
    """A checkpointer that remembers what it was asked to save."""

    directory = "/fake/checkpoints"

    def __init__(self):
        self.saved = []

    def save(self, step, state, force=False):
        self.saved.append((step, state, force))

    def latest_step(self):
        return self.saved[-1][0] if self.saved else None

    def wait_until_finished(self):
        pass


class Writer:
    def __init__(self):
        self.rows = []

    def write(self, step, metrics):
        self.rows.append((step, metrics))

    def advance(self, steps=1):
        pass


def _run(total=7, log_every=3, checkpoint_every=2, losses=None, monitor=None, **kwargs):
    """The loop over a step that counts and takes one (fake) second; ``monitor(done, clock)``
    runs between steps."""
    saver, writer, now = Saver(), Writer(), [0.0]
    losses = losses or (lambda step: float(step))
    if monitor is not None:
        kwargs["between_steps"] = lambda done, state: monitor(done, now)

    def step_fn(state, batch, step):
        now[0] += 1.0  # every step takes one second
        return state + 1, {"loss": losses(step), "skipped": 0}

    final = loop.run(
        step_fn,
        0,
        itertools.repeat(None),
        start_step=kwargs.pop("start_step", 0),
        total_steps=total,
        log_every=log_every,
        checkpoint_every=checkpoint_every,
        fetch=dict,
        checkpointer=saver,
        to_checkpoint=lambda state: state,
        writer=writer,
        images_per_step=10,
        clock=lambda: now[0],
        **kwargs,
    )
    return final, saver, writer, now


def test_every_step_of_an_interval_is_logged_checkpoint_steps_included():
    final, saver, writer, _ = _run()
    assert final == 7
    assert [(s, state) for s, state, _ in saver.saved] == [(2, 2), (4, 4), (6, 6), (7, 7)]
    # Steps 0-2 in the first summary, though step 2 (done=2) was a checkpoint step: its
    # metrics are fetched there and kept for the log, not dropped.
    assert [(s, m["loss"]) for s, m in writer.rows] == [(3, 1.0), (6, 4.0), (7, 6.0)]
    assert [m["images_per_s"] for _, m in writer.rows] == [10.0, 10.0, 10.0]


def test_a_monitor_between_steps_is_not_training_time():
    def slow_monitor(done, now):
        now[0] += 100.0 if done == 2 else 0.0  # e.g. a kNN monitor after step 2

    *_, writer, _ = _run(total=3, log_every=3, checkpoint_every=10, monitor=slow_monitor)
    assert writer.rows[0][1]["images_per_s"] == pytest.approx(10.0)  # 30 images in 3 s


def test_a_non_finite_loss_names_the_step_and_the_last_checkpoint():
    with pytest.raises(lifecycle.NonFiniteLossError) as error:
        _run(losses=lambda step: math.nan if step == 4 else 1.0, hint="Lower the rate.")
    message = str(error.value)
    assert "diverged at step 5: loss nan" in message
    assert "The last good checkpoint: step 4 in /fake/checkpoints. Lower the rate." in message


def test_preemption_saves_at_the_step_it_arrived_and_exits_75(monkeypatch):
    monkeypatch.setattr(lifecycle, "should_stop", lambda flag, step: step == 5)
    with pytest.raises(lifecycle.Preempted) as exit_info:
        _run()
    assert exit_info.value.code == 75 == lifecycle.PREEMPTED_EXIT_CODE


def test_the_probe_is_averaged_over_labelled_rows_and_skipped_steps_are_counted():
    rows = [
        {"loss": 1.0, "probe_top1": 1.0, "probe_loss": 2.0, "probe_count": 3.0, "skipped": 0},
        {"loss": 3.0, "probe_top1": 0.0, "probe_loss": 4.0, "probe_count": 1.0, "skipped": 0},
        {"loss": math.nan, "probe_top1": 0.0, "probe_loss": 0.0, "probe_count": 9.0, "skipped": 1},
    ]
    summary = loop.summarise(rows)
    assert summary["loss"] == 2.0 and summary["skipped"] == 1.0
    assert summary["probe_top1"] == 0.75 and summary["probe_loss"] == 2.5
    assert summary["probe_count"] == 4.0
