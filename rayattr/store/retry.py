"""Bounded retries with jittered exponential back-off for transient object-store errors.

Two layers: botocore's "standard" retry mode retries one request on throttling, 5xx and
connection blips (its own jittered back-off and retry quota); this one retries the whole
operation for outages that outlast it (an S3 server restarting), and turns what is left
into a StoreError naming the operation and the endpoint.
"""

from __future__ import annotations

import builtins
import errno
import logging
import random
import time
from typing import Callable, TypeVar

from .errors import StoreError
from .options import StoreOptions

log = logging.getLogger(__name__)
T = TypeVar("T")

# What "try again later" looks like in an S3 answer: the error code, else the HTTP status
# (botocore's standard retry mode uses the same codes and statuses).
_TRANSIENT_CODES = frozenset({
    "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "InternalError",
    "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "TooManyRequestsException", "OperationAborted"})
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
# Errnos worth retrying when no S3 answer is attached: s3fs gives throttling EBUSY and a 500
# EREMOTEIO. Not EIO: that is s3fs' catch-all for codes it does not know (e.g. a 400).
_TRANSIENT_ERRNOS = frozenset({errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT,
                               getattr(errno, "EREMOTEIO", 121)})


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


def s3_answer(err: BaseException) -> tuple[str | None, int | None] | None:
    """(error code, HTTP status) of the botocore ClientError behind err (s3fs keeps it as
    __cause__ of the OSError it raises), or None when no S3 answer is attached."""
    seen = 0
    while err is not None and seen < 8:
        response = getattr(err, "response", None)
        if isinstance(response, dict) and ("Error" in response or "ResponseMetadata" in response):
            code = (response.get("Error") or {}).get("Code")
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            return (str(code) if code else None), (int(status) if status else None)
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def is_transient(err: BaseException) -> bool:
    """True for errors worth retrying: network trouble, timeouts, throttling, 5xx.

    Decided by the S3 error code and HTTP status when the server answered, else by the
    exception type and errno; never by the message (an ENOSPC on a shard named
    00000500-00000507.arrow is not a server error).
    """
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    answer = s3_answer(err)
    if answer is not None:
        code, status = answer
        return code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS
    if isinstance(err, _TRANSIENT):
        return True
    # local errors are OSError subclasses (NotADirectoryError, ...) and are not retried
    return type(err) is OSError and err.errno in _TRANSIENT_ERRNOS


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
            # jitter, so writers that failed together do not come back together; at least
            # half the delay, so max_attempts still rides out a known outage length
            pause = delay * random.uniform(0.5, 1.0)
            log.warning("%s: transient error (%s), retry %d/%d in %.2fs", what,
                        type(err).__name__, attempt, attempts - 1, pause)
            time.sleep(pause)
            delay = min(delay * 2, options.backoff_max_s)
    raise AssertionError("unreachable")
