"""Bounded retries with exponential back-off for transient object-store errors."""

from __future__ import annotations

import builtins
import errno
import logging
import time
from typing import Callable, TypeVar

from .errors import StoreError
from .options import StoreOptions

log = logging.getLogger(__name__)
T = TypeVar("T")

# Words in an error message that mean "try again later" (S3 throttling / server errors).
_TRANSIENT_ERRNOS = (errno.EBUSY, errno.EIO, getattr(errno, "EREMOTEIO", 121))
_TRANSIENT_WORDS = ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
                    "Service Unavailable", "Internal Server Error", "503", "502", "500")


def _transient_types() -> tuple[type, ...]:
    types: list[type] = [TimeoutError, builtins.ConnectionError]
    try:
        import botocore.exceptions as bce
        types += [bce.ConnectionError, bce.HTTPClientError, bce.ConnectionClosedError]
    except ImportError:  # s3 extras absent: local-only installation
        pass
    try:
        import aiohttp
        types.append(aiohttp.ClientError)
    except ImportError:
        pass
    try:
        from fsspec.exceptions import FSTimeoutError
        types.append(FSTimeoutError)
    except ImportError:
        pass
    return tuple(types)


_TRANSIENT = _transient_types()


def is_transient(err: BaseException) -> bool:
    """True for errors worth retrying: network trouble, timeouts, throttling, 5xx."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    if isinstance(err, _TRANSIENT):
        return True
    # s3fs turns throttling / 5xx answers into plain OSErrors (EBUSY, EREMOTEIO, EIO); local
    # errors are OSError subclasses (NotADirectoryError, ...) and are not retried.
    if type(err) is OSError:
        return err.errno in _TRANSIENT_ERRNOS or any(w in str(err) for w in _TRANSIENT_WORDS)
    return False


def is_missing_credentials(err: BaseException) -> bool:
    try:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError
    except ImportError:
        return False
    return isinstance(err, (NoCredentialsError, PartialCredentialsError))


def with_retries(fn: Callable[[], T], what: str, options: StoreOptions, where: str = "",
                 attempts: int | None = None) -> T:
    """Run fn(); retry transient failures with back-off, then raise a StoreError.

    `what` names the operation and `where` the endpoint, both for the error message.
    Missing credentials and access denied become StoreErrors at once; FileNotFoundError
    passes through for the caller to interpret.
    """
    attempts = attempts or options.max_attempts
    delay = options.backoff_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except StoreError:
            raise
        except Exception as err:  # noqa: BLE001 - classified below
            if is_missing_credentials(err):
                raise StoreError(
                    f"{what}: missing S3 credentials. Set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                    "(or a profile / IAM role), or pass key/secret in StoreOptions.storage_options"
                ) from None
            if isinstance(err, PermissionError):
                hint = "; check the credentials and the bucket policy" if where else ""
                raise StoreError(f"{what}: access denied ({err}){hint}") from None
            if not is_transient(err):
                raise
            if attempt == attempts:
                raise StoreError(
                    f"{what}: object store unreachable{' at ' + where if where else ''} after "
                    f"{attempt} attempts ({type(err).__name__}: {err})") from err
            log.warning("%s: transient error (%s), retry %d/%d in %.2fs", what,
                        type(err).__name__, attempt, attempts - 1, delay)
            time.sleep(delay)
            delay = min(delay * 2, options.backoff_max_s)
    raise AssertionError("unreachable")
