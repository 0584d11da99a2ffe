"""The live view of a running sweep: its progress bar and table (fake trials stand in for
Tune's; what is tested is the callback's counting)."""

from __future__ import annotations

from types import SimpleNamespace

from raypurify.sweeps.live import LiveTable
from raypurify.sweeps.space import load_space


def fake(trial_id, status, **last):
    return SimpleNamespace(
        trial_id=trial_id,
        status=status,
        config={"kld1": 1.0, "kld2": 3.0, "lambda": 0.01},
        last_result=last,
    )


def test_a_resumed_sweep_counts_the_trials_it_restored_as_ended(capsys):
    live = LiveTable(load_space("demo"), concurrency=1)
    done = fake("a", "TERMINATED", epoch=3, val_accuracy=0.4, objective=0.4)
    stopped = fake("b", "TERMINATED", epoch=2, val_accuracy=0.1)
    failed = fake("c", "ERROR")
    restarted = fake("d", "RUNNING")
    trials = [done, stopped, failed, restarted]

    live.on_trial_start(0, trials, restarted)
    assert live._progress().n == 3
    assert [live.rows[t]["status"] for t in "abcd"] == ["DONE", "STOPPED", "ERROR", "RUNNING"]

    restarted.status = "TERMINATED"
    live.on_trial_result(0, trials, restarted, {"epoch": 3, "objective": 0.5})
    live.on_trial_complete(0, trials, restarted)
    assert live._progress().n == 4 and live.rows["d"]["status"] == "DONE"
    live.close()
    assert "0.5" in capsys.readouterr().out


def test_a_fresh_sweep_counts_each_trial_once_when_it_ends():
    live = LiveTable(load_space("demo"), concurrency=1)
    first = fake("a", "RUNNING")
    live.on_trial_start(0, [first], first)
    first.status = "TERMINATED"  # Tune has marked it when the callback hears of it
    live.on_trial_complete(0, [first], first)
    assert live._progress().n == 1 and live.rows["a"]["status"] == "STOPPED"
    live.close()
