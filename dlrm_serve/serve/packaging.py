"""What an archive ships: the ``dlrm_serve`` modules the handler imports.

:func:`serving_modules` follows every ``import`` statement (function-level
ones included, since backends are imported lazily) from the handler through
the package, and returns the files of the modules it reaches plus the
``__init__.py`` of each package on the way (importing ``a.b`` runs
``a/__init__.py``).  ``build_mar.sh`` copies only these, so an archive holds
no launcher, client, trainer or checkpoint converter.

Static, standard library only: nothing is imported to find the closure.
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

__all__ = ["PACKAGE", "serving_modules", "main"]

PACKAGE = "dlrm_serve"


def _module_file(root: Path, name: str) -> Path | None:
    """The file of module ``name`` (dotted) under ``root``, if it is one of ours."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = root.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _imports(path: Path, module: str) -> set[str]:
    """Dotted names imported anywhere in ``path`` (the module ``module``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".") if package else []
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            out.add(base)
            # `from pkg import name` may name a submodule.
            out.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
    return out


def serving_modules(handler: str | os.PathLike, root: str | os.PathLike) -> list[str]:
    """Paths (relative to ``root``, sorted) of the package files ``handler`` needs.

    ``root`` is the folder that holds the ``dlrm_serve`` package.
    """
    root = Path(root)
    seen: dict[str, Path] = {}
    todo = [(n, None) for n in _imports(Path(handler), "")]
    while todo:
        name, _ = todo.pop()
        parts = name.split(".")
        # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
        for k in range(1, len(parts) + 1):
            sub = ".".join(parts[:k])
            if sub in seen:
                continue
            path = _module_file(root, sub)
            if path is None:
                continue
            seen[sub] = path
            todo.extend((n, sub) for n in _imports(path, sub))
    return sorted(str(p.relative_to(root)) for p in seen.values())


def main(argv: list[str] | None = None) -> int:
    """``python -m dlrm_serve.serve.packaging HANDLER ROOT``: print the files, one a line."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m dlrm_serve.serve.packaging HANDLER ROOT", file=sys.stderr)
        return 2
    for rel in serving_modules(args[0], args[1]):
        print(rel)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
