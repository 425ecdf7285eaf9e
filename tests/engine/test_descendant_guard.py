"""The descendant guard (vLLM's EngineCore and model worker die with their pdmesh worker): a real
parent process with a guard and a tree of children is killed with SIGKILL, or releases the guard;
every child, grandchildren included, must be gone. The guard looks at the tree without pause here,
so the kill lands while it is looking: a look spoilt by the parent's death must not be the one it
acts on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from support.mesh import alive, descendants

PARENT = r"""
import subprocess, sys, time
from pdmesh.engine.descendant_guard import DescendantGuard

guard = DescendantGuard(interval_s=0.0)
# Own sessions and no PR_SET_PDEATHSIG: only the guard can end these.
children = [subprocess.Popen(["sleep", "600"], start_new_session=True) for _ in range(3)]
children.append(subprocess.Popen(["sh", "-c", "sleep 600 & sleep 600 & wait"], start_new_session=True))
time.sleep(1.0)  # the guard has looked at the whole tree by now
print("ready", flush=True)
if sys.stdin.readline().strip() == "release":
    guard.release()
    print("released", flush=True)
time.sleep(600)
"""


def _start_parent() -> tuple[subprocess.Popen, set[int]]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline().strip() == "ready"
    tree = descendants(parent.pid)
    assert len(tree) >= 7, tree  # the guard, 3 sleeps, sh and its 2 sleeps
    return parent, tree


def _wait_gone(pids: set[int], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = {pid: open(f"/proc/{pid}/cmdline").read().replace("\0", " ") for pid in alive(pids)}
    assert not survivors, f"still running: {survivors}"


@pytest.mark.parametrize("attempt", range(5))
def test_children_die_when_the_parent_is_killed_with_sigkill(attempt):
    parent, tree = _start_parent()
    time.sleep(0.01 * attempt)  # the kill lands at a different point of the guard's look each time
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    _wait_gone(tree)


def test_release_kills_what_is_left_and_ends_the_guard():
    parent, tree = _start_parent()
    try:
        parent.stdin.write("release\n")
        parent.stdin.flush()
        assert parent.stdout.readline().strip() == "released"
        _wait_gone(tree - {parent.pid})
    finally:
        parent.kill()
        parent.wait()
