"""Errors of the array layer, each with the HTTP status the API answers with."""

from __future__ import annotations

import errno


class ArrayError(Exception):
    """Base: ``code`` is a short machine word, ``status`` the HTTP status."""

    code = "error"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ArrayError):
    code, status = "invalid", 400


class TooLarge(ArrayError):
    """A request body past the API's limit (HTTP 413 Content Too Large)."""

    code, status = "too_large", 413


class NotFound(ArrayError):
    code, status = "not_found", 404


class Conflict(ArrayError):
    code, status = "conflict", 409


class Busy(ArrayError):
    """Try again: the array is still waiting for something (a fence for its hosts' writes)."""

    code, status = "busy", 503


class NoSpace(ArrayError):
    code, status = "no_space", 507


class Unsupported(ArrayError):
    code, status = "unsupported", 501


#: errnos of a file system without room for what was asked (EFBIG: a size it cannot hold)
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def storage_error(what: str, e: OSError) -> ArrayError:
    """The array's own storage failed at ``what``: NoSpace (507) where its file system
    has no room (NO_ROOM), else a 500 (code ``error``): neither is the client's to fix
    by freeing room. The message names the errno, not the path (the caller logs that)."""
    name = errno.errorcode.get(e.errno or 0, "unknown error")
    message = f"{what}: {e.strerror or name} ({name})"
    return NoSpace(message) if e.errno in NO_ROOM else ArrayError(message)
