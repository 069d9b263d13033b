"""Errors of the array layer, each with the HTTP status the API answers with."""

from __future__ import annotations


class ArrayError(Exception):
    """Base: ``code`` is a short machine word, ``status`` the HTTP status."""

    code = "error"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ArrayError):
    code, status = "invalid", 400


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
