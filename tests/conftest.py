"""Shared test fixtures: paths to ../shared and small helpers."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
UPSTREAM = SHARED / "upstream"
sys.path.insert(0, str(ROOT))


@pytest.fixture
def upstream_dir():
    if not (UPSTREAM / "best_ResNet20_ring4.pth").exists():
        pytest.skip(f"original checkpoints not found in {UPSTREAM} (../shared is absent)")
    return UPSTREAM
