"""The supervisor with real child processes: restarts with doubling backoff, gives up after too
many crashes in the window, leaves healthy children alone, stops everything."""

from __future__ import annotations

import subprocess
import sys
import time

from pdmesh.serve_config import SupervisionConfig
from pdmesh.supervisor import Supervisor

FAST = SupervisionConfig(restart_backoff_s=0.1, restart_backoff_max_s=0.4, max_crashes=4, crash_window_s=30)


def python(code: str):
    return lambda restarts: subprocess.Popen([sys.executable, "-c", code])


def run_until(supervisor: Supervisor, done, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "supervisor did not get there in time"
        supervisor.poll()
        time.sleep(0.01)


def test_backoff_doubles_from_one_second_to_thirty():
    supervisor = Supervisor(SupervisionConfig())
    assert [supervisor.backoff_s(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_crashing_child_is_restarted_with_backoff_then_given_up(capsys):
    supervisor = Supervisor(FAST)
    starts = []

    def start(restarts: int):
        starts.append((restarts, time.monotonic()))
        return subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    child = supervisor.add("decode-0", start)
    run_until(supervisor, lambda: child.given_up)
    assert [n for n, _ in starts] == [0, 1, 2, 3]  # 4 crashes: the 4th ends it
    gaps = [b - a for (_, a), (_, b) in zip(starts, starts[1:])]
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2 and gaps[2] >= 0.4  # 0.1, 0.2, 0.4 (the cap)
    assert child.restarts == 3
    err = capsys.readouterr().err
    assert "decode-0 exited with code 3; restarting it in 0.1s" in err
    assert "GIVING UP on decode-0: it exited 4 times within 30s (last exit code 3)" in err
    supervisor.poll()
    assert len(starts) == 4  # no restart after giving up


def test_crashes_outside_the_window_do_not_count():
    supervisor = Supervisor(SupervisionConfig(restart_backoff_s=0.05, restart_backoff_max_s=0.05, max_crashes=2,
                                              crash_window_s=0.01))
    child = supervisor.add("prefill-0", python("raise SystemExit(1)"))
    run_until(supervisor, lambda: child.restarts >= 4)
    assert not child.given_up


def test_a_running_child_is_left_alone_and_stopped_at_the_end():
    supervisor = Supervisor(FAST)
    sleeper = supervisor.add("scheduler", python("import time; time.sleep(60)"))
    for _ in range(20):
        supervisor.poll()
        time.sleep(0.01)
    assert sleeper.running and sleeper.restarts == 0
    start = time.monotonic()
    supervisor.stop_all(["scheduler"], timeout_s=10)
    assert not sleeper.running and time.monotonic() - start < 10
    assert sleeper.proc.returncode == -15  # SIGTERM
