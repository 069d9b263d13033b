"""Errors, grouped by what must be thrown away (after ovirt-imageio).

- ProtocolError: the peer broke the protocol; drop the connection.
- RequestError: one request failed with an NBD error code; the connection lives.
- OptionError: the handshake refused an option.
"""

from __future__ import annotations

import errno as _errno


class NbdError(Exception):
    """Base of every error this package raises."""


class ProtocolError(NbdError):
    """The byte stream is not valid NBD: the connection must be closed."""


class DisconnectedError(NbdError):
    """The connection is gone (or never came up); pending requests fail with it."""


class OptionError(NbdError):
    """The server refused a handshake option (``reply`` holds NBD_REP_ERR_*)."""

    def __init__(self, message: str, reply: int = 0) -> None:
        super().__init__(message)
        self.reply = reply


class RequestError(NbdError):
    """A request failed; ``error`` is the NBD error value (EIO, EINVAL, ...)."""

    def __init__(self, error: int, message: str = "") -> None:
        self.error = error
        name = _errno.errorcode.get(error, f"error {error}")
        super().__init__(f"{name}: {message}" if message else name)


class BackendError(NbdError):
    """A Backend could not do an operation; carries an errno-like code.

    The server maps it to an NBD error with :func:`nbd_error`.
    """

    def __init__(self, errno: int, message: str = "") -> None:
        self.errno = errno
        super().__init__(message or _errno.errorcode.get(errno, str(errno)))


def nbd_error(errno: int, *, fast_zero: bool = False, df: bool = False) -> int:
    """Map an errno to the NBD error the spec allows (after nbdkit).

    EROFS/EPERM -> EPERM; ENOSPC/EDQUOT/EFBIG -> ENOSPC; ENOTSUP only for
    FAST_ZERO requests; EOVERFLOW only for DF requests; EIO, ENOMEM, EINVAL,
    ESHUTDOWN pass; everything else -> EINVAL.
    """
    if errno in (_errno.EPERM, _errno.EROFS):
        return 1
    if errno in (_errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG):
        return 28
    if errno in (_errno.ENOTSUP, _errno.EOPNOTSUPP):
        return 95 if fast_zero else 22
    if errno == _errno.EOVERFLOW:
        return 75 if df else 22
    if errno in (_errno.EIO, _errno.ENOMEM, _errno.EINVAL, _errno.ESHUTDOWN):
        return errno
    return 22
