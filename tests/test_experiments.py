"""The experiment configs and the sweep runner (experiments/run.py)."""
import argparse
import csv
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from ringq import config as config_lib

pytest_plugins = ["run_helpers"]
sys.path.insert(0, str(ROOT / "experiments"))
import run as runner  # noqa: E402

CONFIGS = sorted((ROOT / "experiments").glob("*/*.yaml"))


def test_every_folder_named_by_the_issue_has_configs():
    folders = {p.parent.name for p in CONFIGS}
    assert {"cifar10", "mnist", "ablations"} <= folders
    names = {p.stem for p in CONFIGS}
    for n in (4, 8):
        assert {f"resnet20_ring{n}", f"resnet32_ring{n}", f"resnet20_ring{n}_kbit",
                f"lenet_ring{n}_kbit"} <= names
    assert {"resnet20_fp32", "resnet32_fp32", "ring8_sin", "ring8_triangle",
            "ring8_interp_linear", "ring_size_2", "ring_size_16"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_is_valid(path):
    raw = yaml.safe_load(path.read_text())
    task = "cifar10" if raw.get("dataset", "cifar10") == "cifar10" else "mnist"
    cfg = config_lib.resolve(argparse.Namespace(config=str(path)), task)
    assert all(cfg[k] == config_lib.load_yaml(path)[k] for k in raw)


def test_published_configs_keep_published_defaults():
    cfg = config_lib.load_yaml(ROOT / "experiments" / "cifar10" / "resnet20_ring4.yaml")
    assert cfg == {**cfg, "epochs": 200, "lr": 0.1, "schedule": [100, 150], "batch_size": 128,
                   "ring_type": "triangle", "ring_size": 4}
    assert "ring_layout" not in cfg  # the published ring stays the default


def test_published_recipes_and_recorded_figures_stay_fp32():
    """Published-recipe configs (and the Fashion-MNIST ones, whose figures were measured in
    FP32) pin FP32; the k-bit, uniform and short-schedule configs take the fast default."""
    for path in CONFIGS:
        cfg = config_lib.load_yaml(path)
        published = cfg.get("quantization", "ring") != "uniform" and \
            cfg.get("ring_layout", "published") == "published"
        pinned = path.parent.name in ("ablations", "mnist") or (
            path.parent.name == "cifar10" and published)
        assert cfg.get("precision", "auto") == ("fp32" if pinned else "auto"), path


def test_scaled_schedule():
    assert runner.scaled_schedule([100, 150], 200, 30) == [15, 22]
    assert runner.scaled_schedule([5, 8], 10, 8) == [4, 6]
    assert runner.scaled_schedule([1, 2], 10, 2) == [1]


def test_runner_sweeps_seeds_and_tabulates(idx_data, tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    common = {"dataset": "fashion-mnist", "model": "mlp", "epochs": 2, "schedule": [1],
              "batch_size": 40, "download": False}
    (folder / "mlp_fp32.yaml").write_text(yaml.safe_dump({**common, "quantization": "none"}))
    (folder / "mlp_ring4.yaml").write_text(yaml.safe_dump({**common, "ring_size": 4}))
    cmd = [sys.executable, str(ROOT / "experiments" / "run.py"), str(folder), "--seeds", "1", "2",
           "--data-dir", str(idx_data), "--output-root", str(tmp_path / "out"), "--jobs", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "out" / "tiny"
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["config"], r["seed"]) for r in rows] == [
        ("mlp_fp32", "1"), ("mlp_fp32", "2"), ("mlp_ring4", "1"), ("mlp_ring4", "2"),
        ("mlp_fp32", "mean"), ("mlp_fp32", "std"), ("mlp_ring4", "mean"), ("mlp_ring4", "std")]
    assert rows[0]["fp32"] and not rows[0]["hard"] and rows[2]["soft"] and rows[2]["hard"]
    seeds_soft = [float(rows[2]["soft"]), float(rows[3]["soft"])]
    assert float(rows[6]["soft"]) == pytest.approx(sum(seeds_soft) / 2, abs=0.006)
    assert float(rows[7]["soft"]) == pytest.approx(abs(seeds_soft[0] - seeds_soft[1]) / 2, abs=0.006)
    assert "| mlp_ring4 | 2 |" in (out / "results.md").read_text()
    again = subprocess.run(cmd + ["--plot", str(tmp_path / "figures")], capture_output=True,
                           text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 0 and "done:" not in again.stdout  # finished runs are skipped
    assert all((tmp_path / "figures" / name).stat().st_size > 10_000
               for name in ("accuracy_vs_bits.png", "training_curves.png"))


def test_runner_passes_precision_and_layout(tmp_path):
    path = ROOT / "experiments" / "cifar10_short" / "resnet20_fp32.yaml"
    args = runner.get_args_parser().parse_args([str(path.parent), "--precision", "bf16",
                                                "--no-channels-last"])
    cmd = runner.build_command(path, 1, tmp_path / "run", args)
    assert cmd[cmd.index("--precision") + 1] == "bf16" and "--no-channels-last" in cmd
    plain = runner.build_command(path, 1, tmp_path / "run",
                                 runner.get_args_parser().parse_args([str(path.parent)]))
    assert "--precision" not in plain and not any("channels-last" in c for c in plain)


@pytest.mark.parametrize("folder", ["cifar10_cpu", "cifar10_cpu_levers"])
def test_full_data_cpu_schedule(folder):
    paths = sorted((ROOT / "experiments" / folder).glob("*.yaml"))
    assert paths
    for path in paths:
        cfg = config_lib.load_yaml(path)
        assert cfg == {**cfg, "val_split": 5000, "epochs": 30, "schedule": [15, 22], "lr": 0.1,
                       "batch_size": 128, "precision": "auto", "channels_last": True}, path.name
        assert "subset" not in cfg  # all 50,000 training images


def test_levers_change_one_setting_of_their_row():
    """Each lever config is its k-bit row with exactly the setting it names changed."""
    changed = {"resnet20_ring4_kbit_sigma1": {"sigma": 1},
               "resnet20_ring8_kbit_sigma2": {"sigma": 2},
               "resnet20_ring8_kbit_ste12": {"ste_epochs": 12}}
    paths = sorted((ROOT / "experiments" / "cifar10_cpu_levers").glob("*.yaml"))
    assert sorted(p.stem for p in paths) == sorted(changed)
    for path in paths:
        row = path.stem.rsplit("_", 1)[0]
        base = config_lib.load_yaml(ROOT / "experiments" / "cifar10_cpu" / f"{row}.yaml")
        assert config_lib.load_yaml(path) == {**base, **changed[path.stem]}


def test_200_epoch_configs_are_their_cpu_rows_on_the_published_schedule():
    """experiments/cifar10_200ep: each config is its 30-epoch full-data row with the paper's
    schedule (200 epochs, milestones 100 and 150) and its straight-through epochs scaled
    with it (a fifth of the run); a ``_distill`` config is its 30-epoch distillation trial
    with this sweep's FP32 run as teacher; nothing else changes."""
    paths = sorted((ROOT / "experiments" / "cifar10_200ep").glob("*.yaml"))
    assert {"resnet20_fp32", "resnet20_ring4_kbit", "resnet20_uniform2", "resnet20_ring4",
            "resnet20_ring8", "resnet20_ring8_kbit", "resnet20_ring4_kbit_distill",
            "resnet20_uniform2_distill"} <= {p.stem for p in paths}
    teacher = "pretrained/resnet20_fp32_200ep_cifar10.pt"
    for path in paths:
        distilled = path.stem.endswith("_distill")
        folder = "cifar10_cpu_distill" if distilled else "cifar10_cpu"
        base = config_lib.load_yaml(ROOT / "experiments" / folder / path.name)
        scaled = {"epochs": 200, "schedule": [100, 150]}
        if distilled:
            scaled["distill_from"] = teacher
        if base.get("ste_epochs"):
            assert base["ste_epochs"] == 6
            scaled["ste_epochs"] = 40  # a fifth of the run, as 6 of 30 (and 12 of 60)
        assert config_lib.load_yaml(path) == {**base, **scaled}, path.name
    assert (ROOT / teacher).is_file()


def test_distillation_trials_are_their_rows_with_the_fp32_teacher():
    """experiments/cifar10_cpu_distill: the 30-epoch k-bit ring-4 and LSQ 2-bit rows, each
    with the shipped 30-epoch FP32 model as teacher and nothing else changed."""
    teacher = {"distill_from": "pretrained/resnet20_fp32_cifar10.pt", "distill_weight": 0.5,
               "distill_temperature": 4.0}
    paths = sorted((ROOT / "experiments" / "cifar10_cpu_distill").glob("*.yaml"))
    assert [p.stem for p in paths] == ["resnet20_ring4_kbit_distill", "resnet20_uniform2_distill"]
    for path in paths:
        row = path.stem.removesuffix("_distill")
        base = config_lib.load_yaml(ROOT / "experiments" / "cifar10_cpu" / f"{row}.yaml")
        assert config_lib.load_yaml(path) == {**base, **teacher}
    assert (ROOT / teacher["distill_from"]).is_file()
