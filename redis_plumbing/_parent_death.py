"""A child process that dies with its parent: the one PR_SET_PDEATHSIG set-up of the project.

The Redis servers that `RedisServer` starts, the balancer's `--spawn` app workers and its
`--workers` balancer processes all use it, so that none outlives the process that started
it, even when that one is killed by SIGKILL. It lives here, in the lowest package of the
project, so that each of the others may import it.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
from collections.abc import Callable

__all__ = ["die_with_parent", "parent_death_hook"]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h

if sys.platform == "linux":
    # Resolved once, at import, in the parent: a child between fork and exec must do as
    # little as possible (no dlopen), since another thread may have held a lock at the fork.
    _prctl: Callable[[int, int], int] | None = ctypes.CDLL(None, use_errno=True).prctl
else:  # pragma: no cover
    _prctl = None


def die_with_parent(parent: int) -> None:
    """In a child just forked by `parent` (a pid): SIGTERM when the parent dies (Linux).

    The kernel watches the *thread* that forked, so fork from a thread that lives as long as
    the child should (the event loop's, the main one). If the parent died before the prctl
    took effect (this process's parent pid is no longer `parent`), no signal will ever come:
    exit 1 at once rather than live on as an orphan. Elsewhere than on Linux only that
    check is made.
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)


def parent_death_hook() -> Callable[[], None] | None:
    """A `preexec_fn` for `subprocess` that calls `die_with_parent` with this process's
    pid; None where there is no parent-death signal (preexec_fn is then best left out)."""
    if _prctl is None:  # pragma: no cover
        return None
    return functools.partial(die_with_parent, os.getpid())
