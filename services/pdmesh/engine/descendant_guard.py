"""A guard process that kills this process's descendants once this process is gone, SIGKILL
included. vLLM spawns its EngineCore (and that its model worker) as children that do not watch
their parent: a vLLM worker killed with -9, or stopped while vLLM was still starting, would leave
~2.5 GB of orphans running. The guard notes the descendants every half second while its stdin
stays open; at EOF (the parent died, or closed it on purpose) it kills the last ones it saw,
each checked by its start time so a recycled pid is never hit. A look taken while the parent was
dying is dropped: its children are already re-parented then, so it would find none of them.
"""

from __future__ import annotations

import os
import subprocess
import sys

_GUARD = r"""
import os, select, signal, sys

def stat(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[1]), fields[19]  # parent pid, start time

def descendants(root):
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                parents[int(name)] = stat(int(name))
            except (OSError, ValueError, IndexError):
                pass
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        for child, (ppid, start) in parents.items():
            if ppid == pid and child != os.getpid() and child not in found:
                found[child] = start
                todo.append(child)
    return found

parent, interval, seen = int(sys.argv[1]), float(sys.argv[2]), {}
while not select.select([sys.stdin], [], [], interval)[0] and os.getppid() == parent:
    found = descendants(parent)
    if os.getppid() == parent:  # the parent lived through the whole look
        seen = found
for pid, start in seen.items():
    try:
        if stat(pid)[1] == start:
            os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError, IndexError):
        pass
"""


class DescendantGuard:
    def __init__(self, interval_s: float = 0.5):
        self._process = subprocess.Popen([sys.executable, "-c", _GUARD, str(os.getpid()), str(interval_s)],
                                         stdin=subprocess.PIPE)

    def release(self) -> None:
        """Kill what is left below this process now, and end the guard."""
        self._process.stdin.close()
        self._process.wait(timeout=30)
