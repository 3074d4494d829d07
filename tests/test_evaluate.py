"""evaluate.py and export.py end to end on a tiny CIFAR-shaped ImageFolder made here."""
import json

import pytest

import evaluate
from conftest import UPSTREAM
from ringq.packing import load_packed
from ringq.runtime import run_cli
from run_helpers import exit_code, make_image_folder, run_script, save_checkpoint

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
    best = report["recorded_best"]
    assert "recorded_accuracy" not in report
    assert (best["split"], best["epoch"], best["mode"], best["of"]) == ("test", 1, "soft",
                                                                        "this run")
    assert (f"recorded        best test accuracy {best['accuracy']:.2f} (soft) at epoch 1 of this "
            f"run (this file's epoch)") in result.stdout


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
    assert reports[1]["recorded_best"] == {**reports[0]["recorded_best"],
                                           "of": "source checkpoint"}
    _, _, extra = load_packed(packed)
    assert extra == {"dataset": "cifar10", "source": {
        "file": "last.pt", "epoch": 1,
        "best": {k: reports[0]["recorded_best"][k] for k in ("accuracy", "split", "epoch",
                                                             "mode")}}}
    assert str(trained) not in json.dumps(extra)
    result = run_script("evaluate.py", "--checkpoint", packed, "--data-dir", cifar_folder,
                        "--quiet", "--no-download")
    assert "(soft) at epoch 1 of the source checkpoint last.pt, not this file's" in result.stdout


FP32 = {"model": "resnet20", "quantization": "none", "num_classes": 10, "in_channels": 3,
        "image_size": 32}


@pytest.fixture(scope="module")
def fp32_checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("fp32") / "best.pt", FP32,
                           {"dataset": "cifar10", "data_dir": "/somewhere/data"}, epoch=26,
                           best={"epoch": 26, "accuracy": 85.44, "mode": "fp32", "split": "val"})


def test_ptq_report_labels_the_fp32_figure_as_the_source_s(fp32_checkpoint, cifar_folder,
                                                           tmp_path):
    out = tmp_path / "r.json"
    result = run_script("evaluate.py", "--checkpoint", fp32_checkpoint, "--data-dir",
                        cifar_folder, "--ptq-bits", 4, "--json", out, "--quiet", "--no-download")
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report["accuracy"]) == {"hard"} and report["ptq"] == {"bits": 4, "scale": "mse"}
    assert report["recorded_best"] == {"accuracy": 85.44, "split": "val", "epoch": 26,
                                       "mode": "fp32", "of": "source checkpoint"}
    assert ("best val accuracy 85.44 (fp32) at epoch 26 of the source checkpoint best.pt, not "
            "this file's") in result.stdout


def test_default_data_dir_is_dot_data_not_the_recorded_one(fp32_checkpoint, tmp_path,
                                                           monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert exit_code(run_cli, evaluate.main, ["--checkpoint", str(fp32_checkpoint),
                                              "--no-download", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no such data directory data;") and err.count("\n") == 1
    assert "/somewhere" not in err and not (tmp_path / "data").exists()


def test_bn_recalibration_of_fp32_is_refused_before_data_or_evaluation(
        fp32_checkpoint, cifar_folder, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("refuse before loading data or evaluating")
    for name in ("evaluate", "evaluate_all_modes"):
        monkeypatch.setattr(evaluate, name, never)
    monkeypatch.setattr(evaluate.data_lib, "load_split", never)
    assert exit_code(run_cli, evaluate.main, ["--checkpoint", str(fp32_checkpoint),
                                              "--data-dir", str(cifar_folder),
                                              "--bn-recalibrate", "100", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: --bn-recalibrate needs a quantized model (a ring or uniform "
                   "checkpoint, or --ptq-bits K)\n")


def test_original_checkpoint_needs_no_flag_but_data(cifar_folder, tmp_path):
    if not (UPSTREAM / "best_ResNet20_ring8.pth").exists():
        pytest.skip(f"original checkpoints not found in {UPSTREAM} (../shared is absent)")
    out = tmp_path / "r.json"
    result = run_script("evaluate.py", "--checkpoint", UPSTREAM / "best_ResNet20_ring8.pth",
                        "--data-dir", cifar_folder, "--json", out, "--quiet", "--no-download")
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["ring_size"] == 8 and report["num_distinct_values"] == 4
    assert report["recorded_best"] == {"accuracy": 89.99, "split": None, "epoch": None,
                                       "mode": None, "of": "this run"}
    assert report["source"] == "upstream"
    assert "recorded        best accuracy 89.99 of this run; this file holds epoch 169" \
        in result.stdout
