"""evaluate.py and export.py end to end on a tiny CIFAR-shaped ImageFolder made here."""
import json

import pytest

from conftest import UPSTREAM
from run_helpers import make_image_folder, run_script

pytest_plugins = ["run_helpers"]
CLASSES = tuple(f"c{i}" for i in range(10))


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("cifar"), classes=CLASSES, per_class=3)


@pytest.fixture(scope="module")
def trained(cifar_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "resnet20"
    result = run_script("train_cifar10.py", "--data-dir", cifar_folder, "--no-download",
                        "--device", "cpu", "--epochs", 1, "--schedule", "--batch-size", 10, "--ring-size", 4,
                        "--ring-layout", "distinct", "--output-dir", out, "--quiet")
    assert result.returncode == 0, result.stderr
    return out


def test_report_and_json(trained, cifar_folder, tmp_path):
    out = tmp_path / "r.json"
    result = run_script("evaluate.py", "--checkpoint", trained / "last.pt", "--data-dir",
                        cifar_folder, "--json", out, "--quiet", "--no-download")
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report["accuracy"]) == set(report["loss"]) == {"soft", "hard"}
    assert report["num_examples"] == 30 and report["model"] == "resnet20"
    assert report["nominal_bits"] == 2 and report["num_distinct_values"] == 4
    for words in ("nominal 2.00", "distinct values 4", "effective 2.00", "soft", "hard",
                  "parameters"):
        assert words in result.stdout


def test_export_then_evaluate_gives_the_same_hard_accuracy(trained, cifar_folder, tmp_path):
    packed, sizes = tmp_path / "m.rqp", tmp_path / "sizes.json"
    result = run_script("export.py", "--checkpoint", trained / "last.pt", "--output", packed,
                        "--json", sizes, "--quiet")
    assert result.returncode == 0, result.stderr
    stats = json.loads(sizes.read_text())
    assert stats["file_bytes"] == packed.stat().st_size <= 90_000
    assert stats["quantized_layers_ratio"] == 16
    reports = []
    for ckpt in (trained / "last.pt", packed):
        out = tmp_path / f"{ckpt.name}.json"
        result = run_script("evaluate.py", "--checkpoint", ckpt, "--data-dir", cifar_folder,
                            "--json", out, "--quiet", "--no-download")
        assert result.returncode == 0, result.stderr
        reports.append(json.loads(out.read_text()))
    assert reports[1]["accuracy"] == {"hard": reports[0]["accuracy"]["hard"]}
    assert reports[1]["loss"]["hard"] == pytest.approx(reports[0]["loss"]["hard"], abs=1e-6)


def test_original_checkpoint_needs_no_flag_but_data(cifar_folder, tmp_path):
    if not (UPSTREAM / "best_ResNet20_ring8.pth").exists():
        pytest.skip(f"original checkpoints not found in {UPSTREAM} (../shared is absent)")
    out = tmp_path / "r.json"
    result = run_script("evaluate.py", "--checkpoint", UPSTREAM / "best_ResNet20_ring8.pth",
                        "--data-dir", cifar_folder, "--json", out, "--quiet", "--no-download")
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["ring_size"] == 8 and report["num_distinct_values"] == 4
    assert report["recorded_accuracy"] == 89.99 and report["source"] == "upstream"
