"""Whether a process is alive, and what it runs (standard library only).

Shared by the job runner (loop/jobs.py: a job row whose process died is stale) and the trainer's
parent side (loop/train.py: is a run's trainer still there?), so neither imports the other.
"""

from __future__ import annotations

import os
from pathlib import Path


def pid_alive(pid: int | None) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return Path("/proc/self").exists() is False  # not Linux: signal 0 is all we can ask
    except OSError:
        return True
    return not stat[stat.rindex(")") + 2 :].startswith(("Z", "X"))


def runs(pid: int | None, marker: bytes) -> bool:
    """Whether `pid` is alive and `marker` occurs in its command line, so that a reused pid of
    another program does not count. Off Linux, where no command line can be read, liveness alone."""
    if not pid_alive(pid):
        return False
    try:
        return marker in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # not Linux: trust the liveness check
    except OSError:
        return False
