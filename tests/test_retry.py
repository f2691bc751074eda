"""What the store retries: decided by the S3 error code, the HTTP status and the errno, never by
words in the message; back-off is jittered; botocore's own retry mode stays on."""

from __future__ import annotations

import errno

import pytest
from botocore.exceptions import ClientError
from s3fs.errors import translate_boto_error

from rayattr.store import StoreError, StoreOptions
from rayattr.store import retry
from rayattr.store.fs import _s3_kwargs
from rayattr.store.retry import is_transient, with_retries


def s3_error(code: str, status: int) -> OSError:
    """The exception s3fs raises for an S3 answer (a translated ClientError, kept as cause)."""
    err = ClientError({"Error": {"Code": code, "Message": f"{code} says so"},
                       "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")
    return translate_boto_error(err)


@pytest.mark.parametrize("name", ["00000500-00000507.arrow", "00000496-00000503.arrow",
                                  "00000488-00000495.arrow"])
def test_local_disk_full_is_never_retried(name):
    err = OSError(errno.ENOSPC, "No space left on device", f"/store/r/grads/train/r0000/{name}")
    assert not is_transient(err)  # a path containing 500, 502 or 503 is not an HTTP status
    calls = []

    def write():
        calls.append(1)
        raise err

    with pytest.raises(OSError) as raised:
        with_retries(write, "writing", StoreOptions(max_attempts=4, backoff_s=0.001))
    assert raised.value.errno == errno.ENOSPC and len(calls) == 1


@pytest.mark.parametrize("code,status,transient", [
    ("SlowDown", 503, True), ("ServiceUnavailable", 503, True), ("InternalError", 500, True),
    ("RequestTimeout", 400, True), ("BadGateway", 502, True), ("Whatever", 504, True),
    ("TooManyRequestsException", 429, True),
    ("InvalidArgument", 400, False), ("EntityTooLarge", 400, False),
    ("SomethingNew", 400, False),  # s3fs makes an unknown code an EIO: before, retried
    ("NoSuchKey", 404, False), ("AccessDenied", 403, False),
    # a message that mentions 500 does not make a client error a server error
    ("InvalidRange", 416, False),
])
def test_s3_answers_are_classified_by_code_and_status(code, status, transient):
    assert is_transient(s3_error(code, status)) is transient


def test_errno_without_an_answer():
    assert is_transient(OSError(errno.EBUSY, "busy"))
    assert is_transient(OSError(121, "Remote I/O error"))
    assert not is_transient(OSError(errno.EIO, "500 Internal Server Error"))  # words alone: no
    assert not is_transient(OSError(errno.EROFS, "read-only file system: /x/00000502-00000509.arrow"))
    assert is_transient(ConnectionResetError("peer reset"))
    assert not is_transient(NotADirectoryError(errno.ENOTDIR, "not a directory"))


def test_back_off_is_jittered_and_bounded(monkeypatch):
    pauses: list[float] = []
    monkeypatch.setattr(retry.time, "sleep", pauses.append)
    opts = StoreOptions(max_attempts=5, backoff_s=0.4, backoff_max_s=1.0)
    runs = []
    for _ in range(10):
        pauses.clear()
        with pytest.raises(StoreError, match="after 5 attempts"):
            with_retries(lambda: (_ for _ in ()).throw(TimeoutError()), "op", opts)
        assert len(pauses) == 4
        # each pause lies in [half, all] of its exponential delay: 0.4, 0.8, 1.0, 1.0
        assert all(cap / 2 <= p <= cap for p, cap in zip(pauses, (0.4, 0.8, 1.0, 1.0))), pauses
        runs.append(tuple(pauses))
    assert len(set(runs)) == len(runs)  # jittered: ranks retrying together do not retry in step


def test_botocore_standard_retries_stay_on():
    config = _s3_kwargs(StoreOptions())["config_kwargs"]
    assert config["retries"]["mode"] == "standard"
    assert config["retries"]["total_max_attempts"] >= 2  # botocore retries transient S3 errors itself
    # a user's choice (e.g. adaptive, client-side rate limiting) wins
    mine = {"retries": {"mode": "adaptive", "max_attempts": 5}}
    assert _s3_kwargs(StoreOptions(storage_options={"config_kwargs": mine}))["config_kwargs"]["retries"] == \
        mine["retries"]
