"""The error family: the base is never raised bare, user mistakes are family errors,
and the command line maps only the family to a one-line message."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dlrm_serve
from dlrm_serve import cli, errors
from dlrm_serve.errors import DLRMServeError, InvalidInput, NotReady, Unsupported, UsageError

PACKAGE = Path(dlrm_serve.__file__).parent

# Modules whose user mistakes were moved to the family; a new `raise ValueError(` there is a regression.
NO_VALUE_ERROR = [
    "config.py",
    "artifacts.py",
    "cli",
    "client",
    "testing",
    "offline/score.py",
    "offline/evaluation.py",
    "offline/explain_tools.py",
    "serve/kserve_server.py",
    "runtime/explain.py",
]


def _sources(paths):
    for rel in paths:
        p = PACKAGE / rel
        yield from sorted(p.rglob("*.py")) if p.is_dir() else [p]


def _raised(path: Path, name: str) -> list[int]:
    """Lines of ``raise name(...)`` (or ``raise name``) in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id == name or isinstance(exc, ast.Attribute) and exc.attr == name:
                lines.append(node.lineno)
    return lines


def test_the_base_is_never_raised_bare():
    found = {
        str(p.relative_to(PACKAGE)): lines
        for p in PACKAGE.rglob("*.py")
        if "_proto" not in p.parts and (lines := _raised(p, "DLRMServeError"))
    }
    assert found == {}, f"raise a subclass of DLRMServeError, not the base: {found}"


def test_scan_finds_a_bare_raise(tmp_path):
    # The scan itself must be able to fail.
    f = tmp_path / "m.py"
    f.write_text("from dlrm_serve import errors\ndef f():\n    raise errors.DLRMServeError('x')\n", encoding="utf-8")
    assert _raised(f, "DLRMServeError") == [3]


def test_user_mistakes_are_family_errors_here():
    found = {
        str(p.relative_to(PACKAGE)): lines
        for p in _sources(NO_VALUE_ERROR)
        if (lines := _raised(p, "ValueError"))
    }
    assert found == {}, f"raise a family error (errors.py) for a user mistake, not ValueError: {found}"


def test_every_error_is_exported_and_documented():
    classes = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, DLRMServeError)}
    assert classes == set(errors.__all__)
    for name in classes:
        assert name in errors.__doc__, f"{name} is missing from the tree in errors.py's docstring"


@pytest.mark.parametrize(
    "cls, status", [(InvalidInput, 400), (UsageError, 400), (Unsupported, 400), (NotReady, 503), (errors.LaunchError, 500)]
)
def test_statuses(cls, status):
    e = cls("m")
    assert e.status == status
    assert e.to_dict() == {"code": status, "type": cls.__name__, "message": "m"}


def test_launch_error_lives_in_errors():
    from dlrm_serve.testing import launcher

    assert launcher.LaunchError is errors.LaunchError


def _main_raising(monkeypatch, exc):
    # A sub-command of its own, registered like the real ones, that raises ``exc``.
    def add(sub):
        def boom(_args):
            raise exc

        sub.add_parser("boom").set_defaults(func=boom)

    monkeypatch.setattr(cli, "REGISTRY", [add])
    return cli.main(["boom"])


def test_cli_maps_the_family_to_exit_2(monkeypatch, capsys):
    assert _main_raising(monkeypatch, UsageError("--rows must be positive, got -1")) == 2
    assert capsys.readouterr().err == "dlrm-serve boom: --rows must be positive, got -1\n"


def test_cli_lets_an_internal_error_through(monkeypatch):
    # A numpy ValueError deep inside is a bug, not the user's mistake: it keeps its traceback.
    with pytest.raises(ValueError, match="operands could not be broadcast"):
        _main_raising(monkeypatch, ValueError("operands could not be broadcast together"))
