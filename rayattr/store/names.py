"""Naming a run: a bare run id is looked up in the default store, anything else is a URI."""

from __future__ import annotations

import os

from .errors import StoreError
from .layout import RUN_JSON
from .options import StoreOptions
from .run import Run

DEFAULT_STORE = "./rayattr_runs"  # the job's default store.uri
STORE_ENV = "RAYATTR_STORE"


def default_store() -> str:
    """$RAYATTR_STORE if set, else ./rayattr_runs."""
    return os.environ.get(STORE_ENV) or DEFAULT_STORE


def is_bare_name(ref: str) -> bool:
    """A run id alone (no scheme, no path separator), and not a run directory right here."""
    ref = os.fspath(ref)
    if "://" in ref or "/" in ref or os.sep in ref or ref.startswith((".", "~")):
        return False
    return not os.path.isfile(os.path.join(ref, RUN_JSON))


def resolve_run_uri(ref: str, store: str | None = None) -> str:
    """The URI of run `ref`: `run-2026...` is `<store>/run-2026...` (store: $RAYATTR_STORE or
    ./rayattr_runs); a path, a URI or a run directory in the current directory is itself."""
    ref = os.fspath(ref)
    if not is_bare_name(ref):
        return ref.rstrip("/") if not ref.endswith("://") else ref
    return f"{(store or default_store()).rstrip('/')}/{ref}"


def open_run_ref(ref: str, options: StoreOptions | None = None, mode: str = "read",
                 store: str | None = None) -> Run:
    """Run.open (its `mode`) of the run a user names: a bare run id in `store` (else the default
    store), or a path or URI (resolve_run_uri). Every command that takes a run opens it here; a
    bare name in a missing local store says where it looked and how to point elsewhere (a wrong
    name in an existing store lists its runs)."""
    uri = resolve_run_uri(ref, store)
    if is_bare_name(ref) and "://" not in uri and not os.path.isdir(os.path.dirname(uri)):
        raise StoreError(f"no run '{ref}': runs are looked up in {os.path.dirname(uri)} "
                         f"(${STORE_ENV}, else {DEFAULT_STORE}), which does not exist here; "
                         "set RAYATTR_STORE or give the run's path or URI")
    return Run.open_uri(uri, options=options, mode=mode)
