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


class MigrationStatus(StrEnum):
    """A migration's status, named as QEMU's MigrationStatus names them."""

    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"

    @property
    def ended(self) -> bool:
        return self in MIGRATION_END


# The statuses a migration ends in (plain strings compare equal to them).
MIGRATION_END = frozenset({MigrationStatus.COMPLETED, MigrationStatus.FAILED, MigrationStatus.CANCELLED})

_M = MigrationStatus
# A new migration starts again from NONE. A cancel (or a host that quits) may end
# any pre-copy state; a failure may end any but an ended one.
_MIGRATION_ALLOWED: dict[MigrationStatus, set[MigrationStatus]] = {
    _M.NONE: {_M.SETUP, _M.FAILED},
    _M.SETUP: {_M.WAIT_UNPLUG, _M.ACTIVE, _M.CANCELLING, _M.CANCELLED, _M.FAILED},
    _M.WAIT_UNPLUG: {_M.ACTIVE, _M.CANCELLING, _M.CANCELLED, _M.FAILED},
    _M.ACTIVE: {_M.PRE_SWITCHOVER, _M.DEVICE, _M.POSTCOPY_ACTIVE, _M.COLO, _M.COMPLETED,
                _M.CANCELLING, _M.CANCELLED, _M.FAILED},
    _M.PRE_SWITCHOVER: {_M.DEVICE, _M.CANCELLING, _M.CANCELLED, _M.FAILED},
    _M.DEVICE: {_M.POSTCOPY_ACTIVE, _M.COMPLETED, _M.CANCELLING, _M.CANCELLED, _M.FAILED},
    _M.POSTCOPY_ACTIVE: {_M.POSTCOPY_PAUSED, _M.COMPLETED, _M.CANCELLING, _M.FAILED},
    _M.POSTCOPY_PAUSED: {_M.POSTCOPY_RECOVER, _M.CANCELLING, _M.FAILED},
    _M.POSTCOPY_RECOVER: {_M.POSTCOPY_ACTIVE, _M.POSTCOPY_PAUSED, _M.FAILED},
    _M.COLO: {_M.COMPLETED, _M.FAILED},
    _M.CANCELLING: {_M.CANCELLED, _M.FAILED},
    _M.COMPLETED: set(),
    _M.FAILED: set(),
    _M.CANCELLED: set(),
}


def check_migration_transition(old: MigrationStatus, new: MigrationStatus) -> None:
    if new is not old and new not in _MIGRATION_ALLOWED[old]:
        raise StateError(f"migration status cannot go from {old.value} to {new.value}")
