"""Connection and safety options for a store root (never persisted anywhere)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .errors import StoreError

# Keys of storage_options whose values must never be shown (repr, errors, logs).
SECRET_OPTION_KEYS = ("secret", "key", "token", "password", "username", "aws_secret_access_key",
                      "aws_access_key_id", "aws_session_token")


@dataclass
class StoreOptions:
    """How to reach a store root. Lives only in memory: it is never written to run.json.

    Endpoint and credentials default to the standard AWS environment (AWS_ENDPOINT_URL,
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profiles, IAM roles) when not given here.
    """

    # Extra keyword arguments for the fsspec filesystem (s3fs: endpoint_url, key, secret,
    # token, client_kwargs, config_kwargs, ...). Hidden from repr because it may hold secrets.
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    # Seconds to wait for a TCP connection to the object store before counting a failed attempt.
    connect_timeout_s: float = 5.0
    # Seconds to wait for a response once connected.
    read_timeout_s: float = 60.0
    # Total attempts for one data operation on transient errors (connection, timeout, 5xx);
    # with the back-off below (jittered to 50-100 % of each delay), 8 attempts ride out
    # 8 to 16 s of object-store outage.
    max_attempts: int = 8
    # Attempts for the connectivity check in Run.create/open and list_runs, kept small so a
    # wrong endpoint or missing credentials fail within seconds.
    probe_attempts: int = 3
    # First back-off delay in seconds; doubles after each failed attempt.
    backoff_s: float = 0.25
    # Upper bound for a single back-off delay.
    backoff_max_s: float = 4.0
    # Verify sha256 of every shard part read (recommended; costs ~1 ms per MB).
    verify_checksums: bool = True
    # fsync local files before the rename that publishes them (durability across power loss).
    fsync: bool = True
    # Create the S3 bucket when it does not exist (Run.create only).
    create_bucket: bool = False

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.probe_attempts < 1:
            raise ValueError("StoreOptions.max_attempts and probe_attempts must be >= 1")
        if self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("StoreOptions timeouts must be positive")
        if not isinstance(self.storage_options, dict):
            raise TypeError("StoreOptions.storage_options must be a dict")

    def secret_values(self) -> list[str]:
        """Secret strings carried by these options (used to keep them out of manifests)."""
        out = []
        for k, v in self.storage_options.items():
            if k.lower() in SECRET_OPTION_KEYS and isinstance(v, str) and v:
                out.append(v)
        return out


_WORDS = {"true": True, "false": False, "none": None, "null": None}


def parse_option_value(key: str, text: str) -> Any:
    """A KEY=VALUE option's value as its type: true/false (any case) a bool, none/null None,
    a whole number an int, a number a float, {...} or [...] JSON; anything else the string."""
    word = text.strip().lower()
    if word in _WORDS:
        return _WORDS[word]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.strip()[:1] in ("{", "["):
        try:
            return json.loads(text)
        except ValueError as err:
            raise StoreError(f"storage option {key}: {text!r} is neither a string nor valid JSON ({err})") from None
    return text
