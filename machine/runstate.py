"""Guest run states, named as QEMU names them, with the transitions allowed."""

from __future__ import annotations

from enum import StrEnum


class RunState(StrEnum):
    PRELAUNCH = "prelaunch"
    INMIGRATE = "inmigrate"
    RUNNING = "running"
    PAUSED = "paused"
    FINISH_MIGRATE = "finish-migrate"
    POSTMIGRATE = "postmigrate"
    SHUTDOWN = "shutdown"

    @property
    def running(self) -> bool:
        return self is RunState.RUNNING


_ALLOWED: dict[RunState, set[RunState]] = {
    RunState.PRELAUNCH: {RunState.RUNNING, RunState.INMIGRATE, RunState.FINISH_MIGRATE, RunState.PAUSED},
    RunState.INMIGRATE: {RunState.RUNNING, RunState.PRELAUNCH, RunState.PAUSED, RunState.INMIGRATE},
    RunState.RUNNING: {RunState.PAUSED, RunState.FINISH_MIGRATE, RunState.SHUTDOWN},
    RunState.PAUSED: {RunState.RUNNING, RunState.FINISH_MIGRATE, RunState.PRELAUNCH, RunState.INMIGRATE},
    RunState.FINISH_MIGRATE: {RunState.RUNNING, RunState.PAUSED, RunState.POSTMIGRATE},
    RunState.POSTMIGRATE: {RunState.RUNNING, RunState.PAUSED, RunState.FINISH_MIGRATE, RunState.INMIGRATE},
    RunState.SHUTDOWN: {RunState.RUNNING, RunState.PAUSED},
}


class StateError(RuntimeError):
    pass


def check_transition(old: RunState, new: RunState) -> None:
    if new is not old and new not in _ALLOWED[old]:
        raise StateError(f"run state cannot go from {old.value} to {new.value}")
