"""Shared test fixtures: paths to ../shared and small helpers."""
import os
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
UPSTREAM = SHARED / "upstream"
CIFAR_ARCHIVE = SHARED / "data" / "cifar10-jpeg.tar.xz"
sys.path.insert(0, str(ROOT))


@pytest.fixture
def upstream_dir():
    if not (UPSTREAM / "best_ResNet20_ring4.pth").exists():
        pytest.skip(f"original checkpoints not found in {UPSTREAM} (../shared is absent)")
    return UPSTREAM


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    """The real CIFAR-10 (JPEG ImageFolder): RINGQ_CIFAR10_DIR (CI extracts it once), else the
    archive in ../shared extracted here; skipped when neither exists."""
    given = os.environ.get("RINGQ_CIFAR10_DIR")
    if given:
        return given
    if not CIFAR_ARCHIVE.exists():
        pytest.skip(f"CIFAR-10 JPEG archive not found at {CIFAR_ARCHIVE} (../shared is absent)")
    out = tmp_path_factory.mktemp("cifar10-jpeg")
    with tarfile.open(CIFAR_ARCHIVE) as tar:
        tar.extractall(out, members=[m for m in tar.getmembers()
                                     if m.name.lstrip("./").startswith(("test/", "train/"))],
                       filter="data")
    return str(out)
