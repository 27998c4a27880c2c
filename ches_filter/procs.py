"""Whether a process id is alive: the one check behind stale locks and stale temporaries."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: no process has a pid that large
        return False
    except OSError:  # PermissionError: alive, owned by someone else
        return True
    return True
