"""`die_with_parent`, in real forked children (its SIGTERM on the parent's death is tested
where processes are started: test_server, the balancer's test_supervisor and test_processes)."""

from __future__ import annotations

import os

from redis_plumbing import die_with_parent, parent_death_hook


def exit_code_of_child(parent_of_record: int) -> int:
    """Fork; the child calls `die_with_parent(parent_of_record)` then exits 0."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            die_with_parent(parent_of_record)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_child_of_a_living_parent_goes_on() -> None:
    assert exit_code_of_child(os.getpid()) == 0


def test_a_child_whose_parent_died_before_the_prctl_exits_1_at_once() -> None:
    # Its parent pid is no longer the one that forked it (it was reparented): no signal
    # would ever come, so it must not go on as an orphan.
    assert exit_code_of_child(os.getpid() + 1_000_000) == 1


def test_the_hook_is_bound_to_the_process_that_makes_it() -> None:
    hook = parent_death_hook()
    assert hook is not None
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            hook()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
