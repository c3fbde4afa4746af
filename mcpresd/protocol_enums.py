"""The protocol's closed sets as enums: method names, error codes, priorities, states, modes.

Part of the contract in `mcpresd.protocol`, which re-exports every class here and imports this module on the
first use of one: importing `enum` costs more than a whole `mcpctl allocate` adds to Python's start-up, and
that command's fast path needs none of them. Import them from `mcpresd.protocol`, never from here. The
values the fast path sends are plain strings in `mcpresd.protocol`, taken from there by the members below.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

from mcpresd.protocol import ALLOCATE, ALLOCATION_NOT_FOUND, ALREADY_RELEASED, RELEASE


class Method(StrEnum):
    """Every JSON-RPC method the daemon serves."""

    DAEMON_STATUS = "daemon.status"
    RESOURCES_LIST = "resources.list"
    RESOURCES_ADD = "resources.add"
    RESOURCES_REMOVE = "resources.remove"
    RESOURCES_REFRESH = "resources.refresh"
    ALLOCATE = ALLOCATE
    RELEASE = RELEASE
    ALLOCATIONS_LIST = "allocations.list"
    ALLOCATIONS_GET = "allocations.get"
    ALLOCATIONS_WAIT = "allocations.wait"
    ALLOCATIONS_RENEW = "allocations.renew"
    ALLOCATIONS_EXPLAIN = "allocations.explain"
    ALLOCATIONS_ATTACH = "allocations.attach"
    EVENTS_LIST = "events.list"
    EVENTS_SUBSCRIBE = "events.subscribe"
    METRICS_CURRENT = "metrics.current"
    METRICS_HISTORY = "metrics.history"
    METRICS_EXPOSITION = "metrics.exposition"
    ALERTS_LIST = "alerts.list"
    PREDICT = "predict"
    DB_BACKUP = "db.backup"
    RESOURCES_SET_COST = "resources.set_cost"
    POOLS_LIST = "pools.list"
    POOLS_GET = "pools.get"
    POOLS_CREATE = "pools.create"
    POOLS_DELETE = "pools.delete"
    POOLS_DRAIN = "pools.drain"
    POOLS_UNDRAIN = "pools.undrain"
    POOLS_EVENTS = "pools.events"
    BUDGETS_SET = "budgets.set"
    BUDGETS_LIST = "budgets.list"
    BUDGETS_DELETE = "budgets.delete"
    USAGE = "usage"
    RECOMMEND = "recommend"
    OPTIMISE = "optimise"


class ErrorCode(IntEnum):
    """JSON-RPC error codes: the reserved ones, then mcpres's own (1000-1999)."""

    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603

    UNKNOWN_RESOURCE = 1001
    INSUFFICIENT_CAPACITY = 1002
    ALLOCATION_NOT_FOUND = ALLOCATION_NOT_FOUND
    ALREADY_RELEASED = ALREADY_RELEASED
    RESOURCE_EXISTS = 1005
    RESOURCE_IN_USE = 1006
    IDEMPOTENCY_CONFLICT = 1007
    PERMISSION_DENIED = 1008
    INVALID_HOLDER = 1009
    STORAGE_ERROR = 1010
    NEVER_FITS = 1011
    WAIT_TIMEOUT = 1012
    WITHDRAWN = 1013
    LIMIT_EXCEEDED = 1014
    BUDGET_EXCEEDED = 1015
    POOL_DRAINING = 1016
    UNKNOWN_POOL = 1017
    POOL_EXISTS = 1018
    CLUSTER_FAILED = 1019


class Priority(StrEnum):
    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"
    CRITICAL = "critical"


class AllocationState(StrEnum):
    QUEUED = "queued"
    ACTIVE = "active"
    RELEASED = "released"
    WITHDRAWN = "withdrawn"


class EnforceMode(StrEnum):
    """How an allocation's grant is enforced on its processes (docs/api.md, "Enforcement")."""

    OFF = "off"
    SOFT = "soft"
    HARD = "hard"


class Strategy(StrEnum):
    """How the daemon chooses among resources that fit a typed demand (docs/scheduling.md)."""

    FIRST_FIT = "first-fit"
    BEST_FIT = "best-fit"
    WORST_FIT = "worst-fit"
    ROUND_ROBIN = "round-robin"
    LEAST_LOADED = "least-loaded"
    COST_OPTIMISED = "cost-optimised"
    PERFORMANCE_OPTIMISED = "performance-optimised"
    BALANCED = "balanced"
    LOCALITY_AWARE = "locality-aware"


class Objective(StrEnum):
    """What the allocator optimises when a request may be served from several pools."""

    COST = "cost"
    PERFORMANCE = "performance"
    LATENCY = "latency"
    UTILISATION = "utilisation"
    BALANCED = "balanced"


class PoolState(StrEnum):
    ACTIVE = "active"
    DRAINING = "draining"
    DRAINED = "drained"


class FactoryKind(StrEnum):
    """How a pool gets its members: fixed (listed or selected), carved from a parent, or made by commands."""

    STATIC = "static"
    SLOTS = "slots"
    COMMAND = "command"


class Period(StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


class BudgetScope(StrEnum):
    TOOL = "tool"
    OWNER = "owner"
    POOL = "pool"


class ResourceType(StrEnum):
    CPU = "cpu"
    MEMORY = "memory"
    DISK = "disk"
    NETWORK = "network"
    GPU = "gpu"
    CUSTOM = "custom"
