"""The code's own rules, checked so that they hold as the code grows (docs/architecture.md says why):
keyword-only arguments past a handful, no module reaching into another's private names, no formatter
escapes, and the packages' layering (cli -> classify -> extract -> features, never upwards)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("classify", "extract", "features")
MAX_POSITIONAL = 6
"""Past this many positional parameters a call is read by counting; the rest are keyword-only."""
OUR_MODULES = (*PACKAGES, "cli", "bench", "tests")
LAYERS = {"features": set(), "extract": {"features"}, "classify": {"extract", "features"}}
"""What each package may import from: each layer only from the ones below it."""


def _python_files(*folders: str) -> list[Path]:
    files = []
    for folder in folders:
        path = ROOT / folder
        files += [path] if path.suffix == ".py" else sorted(path.rglob("*.py"))
    return files


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _ours(module: str | None) -> bool:
    return bool(module) and module.split(".")[0] in OUR_MODULES


def test_no_function_takes_more_than_six_positional_parameters():
    crowded = []
    for path in _python_files(*PACKAGES, "cli.py"):
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
                if len(names) > MAX_POSITIONAL:
                    crowded.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}({', '.join(names)})")
    assert not crowded, "make the tail keyword-only (*) or pass a dataclass:\n" + "\n".join(crowded)


def test_no_module_imports_a_private_name_of_another():
    reaching = []
    for path in _python_files(*PACKAGES, "cli.py", "bench", "tests"):
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom) and _ours(node.module):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    reaching.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module} import {private}")
    assert not reaching, "give these a public name where they are defined:\n" + "\n".join(reaching)


def test_no_formatter_escapes():
    marked = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in _python_files(*PACKAGES, "cli.py", "bench", "tests")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "fmt: " + "skip" in line or "fmt: " + "off" in line
    ]
    assert not marked, "let `ruff format` lay these out:\n" + "\n".join(marked)


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_from_the_layers_below(package):
    allowed = LAYERS[package] | {package}
    upward = []
    for path in _python_files(package):
        for node in ast.walk(_tree(path)):
            modules = []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            for module in modules:
                top = module.split(".")[0]
                if top in (*PACKAGES, "cli") and top not in allowed:
                    upward.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {module}")
    assert not upward, f"{package} may import only from {sorted(allowed)}:\n" + "\n".join(upward)


def test_finetune_is_a_package_with_one_run_writer():
    assert (ROOT / "classify" / "finetune" / "__init__.py").is_file()
    assert not (ROOT / "classify" / "finetune.py").exists()
    writers = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in _python_files("classify")
        for node in ast.walk(_tree(path))
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", getattr(node.func, "attr", None)) == "save_run"
        and path.name != "runs.py"
    ]
    assert not writers, "run cards are written by classify.runs.write_run only:\n" + "\n".join(writers)
