"""The training run in-process on tiny data: outputs, determinism, resume, NaN policy.

metrics.csv is compared without its ``time_s`` column: the one wall-clock value,
which differs between otherwise identical runs.
"""
import json
import math
import os
import shutil
import signal

import pytest
import torch
import yaml

import evaluate
import ringq.data
import ringq.train
from ringq.checkpoint import safe_load
from ringq.config import OPTIONS
from ringq.engine import Interrupted, StopSignals, lr_at
from ringq.identity import fingerprints
from ringq.runtime import library_versions, run_cli
from ringq.train import METRIC_FIELDS, RUN_FILES
from run_helpers import (exit_code, metric_rows, run_differences, snapshot, tiny_args,
                         train_main, weights)

pytest_plugins = ["run_helpers"]
pytestmark = pytest.mark.usefixtures("one_thread")
THREE_EPOCHS = ("--epochs", 3, "--schedule", 2)


@pytest.fixture(scope="module")
def reference(idx_data, one_thread, tmp_path_factory):
    """An uninterrupted 3-epoch ring-8 LeNet run (lr drop after epoch 2)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train_main("mnist", tiny_args(idx_data, out, *THREE_EPOCHS)) == 0
    return out


def test_run_writes_every_output(reference):
    assert sorted(p.name for p in reference.iterdir()) == sorted(RUN_FILES)
    with open(reference / "metrics.csv") as f:
        assert f.readline().strip().split(",") == METRIC_FIELDS
    assert [row["epoch"] for row in metric_rows(reference)] == ["1", "2", "3"]
    final = json.loads((reference / "final.json").read_text())
    assert set(final["accuracy"]) == set(final["loss"]) == {"soft", "hard"}
    assert final["num_examples"] == 60
    assert set(final["best"]) == {"epoch", "accuracy", "mode", "split"}
    config = yaml.safe_load((reference / "config.yaml").read_text())
    assert config["seed"] == 42 and config["versions"] == library_versions()
    # every option but the run's own folder and this machine's paths (the data are absolute here)
    assert {o.name for o in OPTIONS} - set(config) == {"output_dir", "data_dir"}
    assert config["fingerprint"] == final["fingerprint"] == fingerprints(config)
    assert final["checkpoint"] == "last.pt" and final["split"] == "fashion-mnist, no " \
        "validation split"
    assert set(config["git"]) == {"commit", "dirty"} and final["git"] == config["git"]


def test_checkpoints_are_plain_data_and_evaluate_alone(reference, idx_data, tmp_path, capsys):
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(reference / name, weights_only=True)
        assert ckpt["format"] == "ringq" and ckpt["config"]["data_dir"]  # for --resume
    report_path = tmp_path / "report.json"
    assert exit_code(run_cli, evaluate.main, ["--checkpoint", str(reference / "last.pt"),
                                              "--data-dir", str(idx_data), "--json",
                                              str(report_path), "--quiet", "--no-download"]) == 0
    report = json.loads(report_path.read_text())
    final = json.loads((reference / "final.json").read_text())
    for key in ("accuracy", "loss"):  # other batch size than in training: float noise only
        assert report[key] == pytest.approx(final[key], abs=1e-3)
    assert "soft" in capsys.readouterr().out


def test_fp32_final_json_reports_fp32(idx_data, tmp_path):
    out = tmp_path / "fp32"
    assert train_main("mnist", tiny_args(idx_data, out, "--quantization", "none",
                                         "--model", "mlp", "--epochs", 1, "--schedule")) == 0
    final = json.loads((out / "final.json").read_text())
    assert set(final["accuracy"]) == set(final["loss"]) == {"fp32"}
    assert final["best"]["mode"] == "fp32"


def test_same_seed_same_run_other_seed_other_run(reference, idx_data, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    assert train_main("mnist", tiny_args(idx_data, again, *THREE_EPOCHS)) == 0
    assert run_differences(reference, again) == []
    assert train_main("mnist", tiny_args(idx_data, other, *THREE_EPOCHS, "--seed", 7)) == 0
    assert yaml.safe_load((other / "config.yaml").read_text())["seed"] == 7
    a, b = weights(reference / "last.pt"), weights(other / "last.pt")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_config_file_then_flags(idx_data, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: mlp\nring-size: 4\nepochs: 1\nschedule: []\nlr: 0.05\n")
    out = tmp_path / "run"
    assert train_main("mnist", tiny_args(idx_data, out, "--config", config, "--lr", 0.02,
                                         "--epochs", 1, "--schedule")) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["model"], saved["ring_size"], saved["lr"]) == ("mlp", 4, 0.02)


def test_existing_run_needs_resume_or_overwrite(reference, idx_data, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "notes.txt").write_text("kept")
    before = snapshot(out)
    assert train_main("mnist", tiny_args(idx_data, out, *THREE_EPOCHS)) == 2
    err = capsys.readouterr().err
    assert f"--resume {out / 'last.pt'}" in err and "--overwrite" in err
    assert snapshot(out) == before
    assert train_main("mnist", tiny_args(idx_data, out, "--overwrite", "--epochs", 1,
                                         "--schedule")) == 0
    assert len(metric_rows(out)) == 1 and safe_load(out / "last.pt")["epoch"] == 1
    assert (out / "notes.txt").read_text() == "kept"


def test_lr_follows_the_config_schedule():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [2, 4], 0.1)
    cfg = {"lr": 0.1, "gamma": 0.1, "schedule": [2, 4]}
    for epoch in range(1, 7):
        assert lr_at(cfg, epoch) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)
        optimizer.step()
        scheduler.step()


def test_resume_with_longer_schedule_matches_one_run(reference, idx_data, tmp_path):
    """A 1-epoch run extended to 3 epochs by --resume equals the 3-epoch run."""
    out = tmp_path / "run"
    assert train_main("mnist", tiny_args(idx_data, out, "--epochs", 1, "--schedule")) == 0
    assert train_main("mnist", ["--resume", out / "last.pt", *THREE_EPOCHS]) == 0
    assert run_differences(reference, out) == []


@pytest.mark.parametrize("when", ["mid-epoch", "end-of-epoch"])
def test_sigint_then_resume_matches_one_run(reference, idx_data, tmp_path, monkeypatch, capsys,
                                            when):
    """SIGINT during epoch 2 (before its first step ends, or after its last): exit 130 with a
    resume command; resuming ends exactly as the uninterrupted run."""
    real = ringq.train.train_one_epoch

    def interrupted(model, loader, optimizer, cfg, epoch, *args):
        if epoch == 2 and when == "mid-epoch":
            os.kill(os.getpid(), signal.SIGINT)
        stats = real(model, loader, optimizer, cfg, epoch, *args)
        if epoch == 2 and when == "end-of-epoch":
            os.kill(os.getpid(), signal.SIGINT)
        return stats
    monkeypatch.setattr(ringq.train, "train_one_epoch", interrupted)
    out = tmp_path / "run"
    assert train_main("mnist", tiny_args(idx_data, out, *THREE_EPOCHS)) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SIGINT received" in err
    assert err.strip().endswith(f"python train_mnist.py --resume {out / 'last.pt'}")
    saved = 1 if when == "mid-epoch" else 2
    assert safe_load(out / "last.pt")["epoch"] == saved and len(metric_rows(out)) == saved
    assert not (out / "final.json").exists()
    monkeypatch.undo()
    assert train_main("mnist", ["--resume", out / "last.pt"]) == 0
    assert run_differences(reference, out) == []


def test_second_signal_stops_at_once():
    previous = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == "SIGTERM"
        with pytest.raises(Interrupted, match="second signal"):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) == previous


@pytest.fixture
def nan_batch(monkeypatch):
    """The first training batch of epoch 2 becomes NaN; records last.pt's bytes at that time."""
    real = ringq.data.make_loader
    seen = {}

    class Poisoned:
        def __init__(self, loader, out):
            self.loader, self.out, self.epoch = loader, out, 0

        def set_epoch(self, epoch):
            self.epoch = epoch
            self.loader.set_epoch(epoch)

        def __len__(self):
            return len(self.loader)

        def global_batch_sizes(self):
            return self.loader.global_batch_sizes()

        def __iter__(self):
            for step, (x, y) in enumerate(self.loader):
                if self.epoch == 2 and step == 0:
                    seen["last.pt"] = (self.out / "last.pt").read_bytes()
                    x = torch.full_like(x, math.nan)
                yield x, y

    def make_loader(kind, dataset, batch_size, shuffle, **kwargs):
        loader = real(kind, dataset, batch_size, shuffle=shuffle, **kwargs)
        return Poisoned(loader, seen["out"]) if shuffle else loader
    monkeypatch.setattr(ringq.data, "make_loader", make_loader)
    return seen


def test_nan_stops_and_keeps_last_good_checkpoint(idx_data, tmp_path, nan_batch, capsys):
    out = nan_batch["out"] = tmp_path / "run"
    assert train_main("mnist", tiny_args(idx_data, out, *THREE_EPOCHS)) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "non-finite loss or gradient at epoch 2, step 1" in err
    assert f"--resume {out / 'last.pt'}" in err
    assert (out / "last.pt").read_bytes() == nan_batch["last.pt"]
    assert safe_load(out / "last.pt")["epoch"] == 1 and len(metric_rows(out)) == 1
    assert not (out / "final.json").exists()


def test_nan_skip_step_skips_and_counts(idx_data, tmp_path, nan_batch):
    out = nan_batch["out"] = tmp_path / "run"
    assert train_main("mnist", tiny_args(idx_data, out, *THREE_EPOCHS,
                                         "--nan-policy", "skip-step")) == 0
    assert [row["skipped_steps"] for row in metric_rows(out)] == ["0", "1", "0"]
    state = weights(out / "last.pt")
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    final = json.loads((out / "final.json").read_text())
    assert all(math.isfinite(v) for v in final["loss"].values())


def test_kbit_recipe_anneals_sigma_and_evaluates_at_final_sigma(idx_data, one_thread, tmp_path):
    out = tmp_path / "kbit"
    args = tiny_args(idx_data, out, "--epochs", 3, "--schedule", 2, "--ring-size", 4,
                     "--ring-layout", "distinct", "--sigma-final", 0.05, "--ste-epochs", 1,
                     "--position-weight-decay", 0, "--select-mode", "hard", "--val-split", 40,
                     "--position-lr-fan-in", "--position-lr-scale", 0.015625)
    assert train_main("mnist", args) == 0
    rows = metric_rows(out)
    assert [float(r["sigma"]) for r in rows] == pytest.approx([0.5, 0.5 * 0.1 ** 0.5, 0.05])
    assert [r["weight_mode"] for r in rows] == ["soft", "soft", "ste"]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["sigma"] == pytest.approx(0.05) and ckpt["best"]["mode"] == "hard"
    # LeNet's ring layers have fan-in 1*5*5, 20*5*5 and 50*4*4; the last epoch's lr is 0.01
    groups = ckpt["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([0.01, 0.01 * 25 / 64, 0.01 * 500 / 64,
                                                       0.01 * 800 / 64])
    assert [g["weight_decay"] for g in groups] == [1e-4, 0, 0, 0]
    final = json.loads((out / "final.json").read_text())
    assert final["num_distinct_values"] == 4 and final["effective_bits"] == 2
    report_path = tmp_path / "report.json"
    assert exit_code(run_cli, evaluate.main, ["--checkpoint", str(out / "last.pt"), "--json",
                                              str(report_path), "--data-dir", str(idx_data),
                                              "--quiet", "--no-download"]) == 0
    report = json.loads(report_path.read_text())
    assert report["accuracy"] == pytest.approx(final["accuracy"], abs=1e-3)


def test_channels_last_changes_layout_not_results(idx_data, one_thread, tmp_path):
    finals = []
    for name, extra in (("nchw", ("--no-channels-last",)), ("channels_last", ())):
        out = tmp_path / name
        assert train_main("mnist", tiny_args(idx_data, out, "--ring-size", 4, *extra)) == 0
        finals.append(json.loads((out / "final.json").read_text()))
    for mode in ("soft", "hard"):
        assert finals[0]["accuracy"][mode] == pytest.approx(finals[1]["accuracy"][mode], abs=1.0)
        assert finals[0]["loss"][mode] == pytest.approx(finals[1]["loss"][mode], rel=1e-2)
