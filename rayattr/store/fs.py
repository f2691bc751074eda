"""URI -> fsspec filesystem: local paths and file:// (embedded default), s3:// via s3fs."""

from __future__ import annotations

import os
import threading
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import StoreError
from .options import StoreOptions

LOCAL_SCHEMES = ("", "file", "local")
S3_SCHEMES = ("s3", "s3a")
BOTOCORE_ATTEMPTS = 2

# One filesystem object per (process, scheme, options): s3fs clients are costly to build and
# are bound to the process that made them, so the pid is part of the key.
_cache: dict[tuple, fsspec.AbstractFileSystem] = {}
_cache_lock = threading.Lock()


def split_uri(uri: str) -> tuple[str, str]:
    """'s3://b/p' -> ('s3', 'b/p'); '/x' or 'file:///x' -> ('file', '/x'). Rejects other schemes."""
    if not isinstance(uri, (str, os.PathLike)):
        raise StoreError(f"store URI must be a string or path, got {type(uri).__name__}")
    uri = os.fspath(uri)
    if not uri:
        raise StoreError("store URI is empty")
    scheme, sep, rest = uri.partition("://")
    if not sep:
        # A Windows drive letter or a plain path: local.
        scheme, rest = "", uri
    scheme = scheme.lower()
    if scheme in LOCAL_SCHEMES:
        return "file", os.path.abspath(os.path.expanduser(rest))
    if scheme in S3_SCHEMES:
        path = rest.strip("/")
        if not path or path.split("/")[0] == "":
            raise StoreError(f"S3 URI '{uri}' names no bucket (expected s3://bucket/prefix)")
        return "s3", path
    raise StoreError(f"unsupported URI scheme '{scheme}' in '{uri}': rayattr.store supports "
                     "local paths, file:// and s3://")


def join_uri(scheme: str, path: str) -> str:
    return path if scheme == "file" else f"{scheme}://{path}"


def s3_endpoint(options: StoreOptions) -> str:
    """The S3 endpoint that will be used, for error messages (never includes credentials)."""
    so = options.storage_options
    return (so.get("endpoint_url") or (so.get("client_kwargs") or {}).get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            or "the default AWS endpoint")


def _s3_kwargs(options: StoreOptions) -> dict[str, Any]:
    kw = dict(options.storage_options)
    config = dict(kw.pop("config_kwargs", None) or {})
    config.setdefault("connect_timeout", options.connect_timeout_s)
    config.setdefault("read_timeout", options.read_timeout_s)
    # botocore's standard mode retries one request on throttling / 5xx / connection blips,
    # with jitter and a retry quota; two tries keep a dead endpoint's probe within seconds.
    # rayattr.store.retry retries whole operations on top. {"mode": "adaptive"} also works.
    config.setdefault("retries", {"mode": "standard", "total_max_attempts": BOTOCORE_ATTEMPTS})
    kw["config_kwargs"] = config
    # Other processes add objects all the time: a cached listing would hide them (s3fs would
    # even answer FileNotFoundError for a new object whose directory listing is cached).
    kw.setdefault("use_listings_cache", False)
    return kw


def _freeze(obj: Any) -> Any:
    if isinstance(obj, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return tuple(_freeze(v) for v in obj)
    return obj if isinstance(obj, (str, int, float, bool, type(None))) else repr(obj)


def open_store_fs(uri: str, options: StoreOptions | None = None
                  ) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and bare path for a store URI.

    Local paths and file:// give a LocalFileSystem and an absolute path; s3:// gives an
    S3FileSystem (endpoint/credentials from options.storage_options or the AWS environment)
    and "bucket/prefix".
    """
    options = options or StoreOptions()
    scheme, path = split_uri(uri)
    if scheme == "file":
        return LocalFileSystem(), path
    key = (os.getpid(), scheme, _freeze(options.storage_options), options.connect_timeout_s,
           options.read_timeout_s)
    with _cache_lock:
        fs = _cache.get(key)
        if fs is None:
            try:
                import s3fs
            except ImportError as err:  # pragma: no cover - s3fs is a hard dependency
                raise StoreError("s3:// URIs need the 's3fs' package") from err
            try:
                fs = s3fs.S3FileSystem(skip_instance_cache=True, **_s3_kwargs(options))
            except TypeError as err:
                raise StoreError(f"bad StoreOptions.storage_options for s3fs: {err}") from None
            fs.retries = 1  # s3fs' own retry loop; ours is in retry.with_retries
            _cache[key] = fs
    return fs, path
