"""Domain errors. Each is translated to one JSON-RPC error code in `mcpresd.rpc`."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """A request the broker understood and refused."""

    def __init__(self, message: str, **data: Any) -> None:
        super().__init__(message)
        self.message = message
        self.data = data


class InvalidRequest(DomainError):
    """The request is malformed: bad amounts, types or combinations."""


class UnknownResource(DomainError):
    """A named resource does not exist."""


class InsufficientCapacity(DomainError):
    """The request does not fit in what is free now."""


class NeverFits(DomainError):
    """The request exceeds the total capacity, so it can never be granted."""


class AllocationNotFound(DomainError):
    """No allocation has that id (or the caller may not see it)."""


class AlreadyReleased(DomainError):
    """The allocation was released before."""


class ResourceExists(DomainError):
    """A resource with that name (or UUID) is already registered."""


class ResourceInUse(DomainError):
    """The resource is held by an active allocation."""


class IdempotencyConflict(DomainError):
    """The idempotency key was used before for a different request."""


class PermissionDenied(DomainError):
    """The caller may not do this."""


class InvalidHolder(DomainError):
    """The named holder process does not exist."""


class WaitTimeout(DomainError):
    """A queued request's wait ran out; nothing is held."""


class Withdrawn(DomainError):
    """A queued request was withdrawn (cancelled, its holder exited, its client went away)."""


class LimitExceeded(DomainError):
    """The caller has reached a configured limit (queued requests, connections)."""


class BackupFailed(DomainError):
    """The database could not be copied to the backup file."""


class BudgetExceeded(DomainError):
    """A budget's hard limit for the current period is spent; new allocations it covers are refused."""


class PoolDraining(DomainError):
    """The pool is draining or drained: it grants nothing new until it is undrained."""


class UnknownPool(DomainError):
    """No pool has that name (or none matches the pattern)."""


class PoolExists(DomainError):
    """A pool with that name already exists."""


class ClusterFailed(DomainError):
    """The cluster refused or could not take the request (Slurm's own message); nothing changed locally."""
