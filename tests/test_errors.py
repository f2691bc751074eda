"""One error family: every error a user can cause is a RayattrError, which the `rayattr`
command prints as one line with exit status 2; anything else is a bug, shown with its
traceback, exit status 1."""

from __future__ import annotations

import pytest

from rayattr import cli
from rayattr.errors import BUG_EXIT, USER_ERROR_EXIT, IncompleteInputError, RayattrError, UsageError


def user_errors():
    from rayattr.config import ConfigError
    from rayattr.data import DataError
    from rayattr.embed.guard import DivergenceError
    from rayattr.query import QueryError
    from rayattr.record import NonFiniteLoss
    from rayattr.store import StoreError
    from rayattr.validate.errors import ValidationError

    return [ConfigError, DataError, DivergenceError, QueryError, NonFiniteLoss, StoreError, ValidationError,
            IncompleteInputError, UsageError]


def test_every_user_error_is_a_rayattr_error():
    for cls in user_errors():
        assert issubclass(cls, RayattrError), cls
    import rayattr

    assert rayattr.RayattrError is RayattrError


def test_a_user_error_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAYATTR_STORE", str(tmp_path))
    assert cli.main(["show", "no-such-run"]) == USER_ERROR_EXIT
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no-such-run" in err and "\n" not in err


@pytest.mark.parametrize("bug", [ValueError("an internal value"), KeyError("k"), RuntimeError("x")])
def test_anything_else_is_a_bug_with_its_traceback_and_exit_1(monkeypatch, capsys, bug):
    def broken(args):
        raise bug

    monkeypatch.setattr(cli, "cmd_show", broken)
    assert cli.main(["show", "any"]) == BUG_EXIT
    err = capsys.readouterr().err
    assert "Traceback" in err and type(bug).__name__ in err and "bug" in err


def ray_wrapped(err: Exception) -> Exception:
    """The error as ray.get raises it when an actor raised it: a RayTaskError that is also an
    instance of the error's class, its str() the whole remote traceback."""
    from ray.exceptions import RayTaskError

    return RayTaskError("SegmentActor.compute", "Traceback (most recent call last):\n  File ...\n" + str(err),
                        err).as_instanceof_cause()


@pytest.mark.parametrize("which", ["divergence", "incomplete"])
def test_attribute_on_a_failing_run_prints_the_named_error(monkeypatch, capsys, which):
    from rayattr.pipeline import attribution
    from rayattr.embed.guard import DivergenceError

    err = (DivergenceError("segment 1: the recursion diverged at step 17 (K has inf)") if which == "divergence"
           else IncompleteInputError("segment 0: step 3 is incomplete in the 'train' rows"))

    def attribute(*a, **kw):
        raise ray_wrapped(err)

    monkeypatch.setattr(attribution, "attribute", attribute)
    assert cli.main(["attribute", "some-run", "--no-progress"]) == USER_ERROR_EXIT
    out = capsys.readouterr().err.strip()
    assert out == f"error: {err}", out
