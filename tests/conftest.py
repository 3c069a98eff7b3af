"""Shared test helpers: the fast random-init backbone, the real data folder, running the CLI in-process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

SHARED_DATA = ROOT.parent / "shared" / "data"
TINY = "torchvision:regnet_x_400mf"
"""A real torchvision architecture that embeds a 224 px image in ~10 ms with random weights whose
embeddings still vary between images (random-init MobileNets give ~1e-9 everywhere)."""


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is not here")
    return SHARED_DATA


@pytest.fixture
def cli(capsys):
    """Run `cli.py` in this process; returns (exit status, stdout, stderr)."""
    import cli as entry

    def run(*args: str) -> tuple[int, str, str]:
        code = entry.main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
