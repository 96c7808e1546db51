"""Exceptions raised by PegaFlow calls.

Every class derives from :class:`PegaflowError` and, where one fits, a stdlib base, so
``except ValueError`` or ``except TimeoutError`` work as expected. The native client maps
each gRPC status to exactly one of these, keeping the server's message.
"""

from __future__ import annotations


class PegaflowError(Exception):
    """Base of every PegaFlow error."""

    code = "UNKNOWN"


class PegaflowInvalidArgument(PegaflowError, ValueError):
    """The request is malformed (bad layout, ids out of range, wrong hash size...)."""

    code = "INVALID_ARGUMENT"


class PegaflowNotFound(PegaflowError, LookupError):
    """Unknown instance, rank, lease (or expired), or shared-memory file."""

    code = "NOT_FOUND"


class PegaflowAlreadyExists(PegaflowError):
    """The rank is already registered."""

    code = "ALREADY_EXISTS"


class PegaflowPermissionDenied(PegaflowError, PermissionError):
    """Another client's instance or memory, or a missing or wrong auth token."""

    code = "PERMISSION_DENIED"


class PegaflowResourceExhausted(PegaflowError):
    """The cache pool cannot hold the request (too large, or everything is pinned), or a
    server cap (leases, memory mappings) is reached."""

    code = "RESOURCE_EXHAUSTED"


class PegaflowUnavailable(PegaflowError, ConnectionError):
    """The server is unreachable, died mid-call, or is shutting down."""

    code = "UNAVAILABLE"


class PegaflowTimeout(PegaflowError, TimeoutError):
    """A call or a load did not finish before its deadline."""

    code = "DEADLINE_EXCEEDED"


class PegaflowInternalError(PegaflowError):
    """A device or I/O failure on the server, or a bug."""

    code = "INTERNAL"


class PegaflowLoadError(PegaflowError):
    """A load's copy failed, or the server went away before it completed; the destination
    blocks hold undefined bytes."""

    code = "LOAD_FAILED"


__all__ = [
    "PegaflowAlreadyExists",
    "PegaflowError",
    "PegaflowInternalError",
    "PegaflowInvalidArgument",
    "PegaflowLoadError",
    "PegaflowNotFound",
    "PegaflowPermissionDenied",
    "PegaflowResourceExhausted",
    "PegaflowTimeout",
    "PegaflowUnavailable",
]
