"""The package's layers (docs/architecture.md): the import-linter contract in pyproject.toml
holds, and no module imports another module's private (``_name``) names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "distillery"


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def private_imports(package: Path = PACKAGE) -> list[str]:
    """``file:line: from X import _name`` for each private name a module takes from another one.

    A private name is an implementation detail of its module: whatever another module needs
    becomes public, in the layer both can import. Relative imports are resolved, so
    ``from ._x import _y`` counts too; a module may import its own package's ``__init__`` names
    only if they are public as well.
    """
    found = []
    for path in sorted(package.rglob("*.py")):
        here = _module_name(path, package)
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:  # relative: resolve against this module's package
                base = here.split(".") if is_package else here.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not source.startswith("distillery") or source == here:
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(package.parent)}:{node.lineno}: from {source} import {alias.name}")
    return found


def test_no_private_names_imported_across_modules():
    found = private_imports()
    assert not found, "make these names public in the layer both modules import:\n" + "\n".join(found)


def test_private_import_check_sees_absolute_and_relative_imports(tmp_path):
    pkg = tmp_path / "distillery"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from distillery.sub.a import public\n")
    (pkg / "sub" / "a.py").write_text("_private = 1\npublic = 2\n")
    (pkg / "sub" / "b.py").write_text(
        "from distillery.sub.a import _private\nfrom .a import _private as p, public\n"
        "from distillery.sub.a import __doc__\n")
    found = private_imports(pkg)
    assert [f.split(": ", 1)[1] for f in found] == [
        "from distillery.sub.a import _private", "from distillery.sub.a import _private"]


def test_import_contract_holds():
    """``lint-imports`` over pyproject.toml's contracts: the layers and no import cycles."""
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[proc.stdout.find("Broken contracts"):] + proc.stderr
