"""Run identity in the sweep tools: run.py, summarize.py and plot.py never mislabel runs."""
import json
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from run_helpers import ENV

pytest_plugins = ["run_helpers"]
sys.path.insert(0, str(ROOT / "experiments"))
import plot  # noqa: E402
import records  # noqa: E402
import summarize  # noqa: E402

TINY = {"dataset": "fashion-mnist", "model": "mlp", "quantization": "none", "epochs": 1,
        "schedule": [], "batch_size": 40, "download": False, "device": "cpu"}


def fake_run(root, config, seed, accuracy=80.0, **cfg):
    """A finished run's records (config.yaml, final.json) without training."""
    folder = root / config / f"seed{seed}"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(
        {"model": "resnet20", "quantization": "none", "seed": seed, **cfg}))
    (folder / "final.json").write_text(json.dumps({"accuracy": {"fp32": accuracy + seed}}))
    return folder


def runner(folder, out, *extra):
    cmd = [sys.executable, str(ROOT / "experiments" / "run.py"), str(folder), "--seeds", "1",
           "--output-root", str(out), *map(str, extra)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)


@pytest.fixture(scope="module")
def sweep(idx_data, tmp_path_factory):
    """One finished one-epoch FP32 run made by run.py, and its folder of configs."""
    tmp = tmp_path_factory.mktemp("identity")
    (tmp / "tiny").mkdir()
    (tmp / "tiny" / "mlp_fp32.yaml").write_text(yaml.safe_dump(TINY))
    result = runner(tmp / "tiny", tmp / "out", "--data-dir", idx_data)
    assert result.returncode == 0, result.stderr
    return tmp / "tiny", tmp / "out", idx_data


def test_runner_refuses_a_finished_run_of_other_settings(sweep):
    folder, out, data = sweep
    before = (out / "tiny" / "mlp_fp32" / "seed1" / "final.json").read_text()
    result = runner(folder, out, "--data-dir", data, "--epochs", 2)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "mlp_fp32/seed1" in result.stderr and "epochs 1 -> 2" in result.stderr
    assert (out / "tiny" / "mlp_fp32" / "seed1" / "final.json").read_text() == before
    again = runner(folder, out, "--data-dir", data)  # the same settings: skipped, exit 0
    assert again.returncode == 0 and "done:" not in again.stdout


def test_runner_exits_non_zero_when_runs_fail(sweep, tmp_path):
    folder, _, _ = sweep
    result = runner(folder, tmp_path / "out", "--data-dir", tmp_path / "nowhere")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: 1 of 1 run(s) failed")


def test_recorded_fingerprint_matches_what_readers_recompute(sweep):
    _, out, _ = sweep
    run, = records.finished_runs(out / "tiny")
    assert run.final["fingerprint"]["recipe"] == run.recipe
    assert run.final["checkpoint"] == "last.pt"


def test_summarize_refuses_two_recipes_under_one_config(tmp_path, capsys):
    fake_run(tmp_path, "resnet20_fp32", 1, epochs=30)
    fake_run(tmp_path, "resnet20_fp32", 2, epochs=60)
    assert summarize.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "epochs 30 -> 60" in err
    assert not (tmp_path / "summary.md").exists()


def test_seeds_with_other_splits_and_devices_are_one_row(tmp_path, capsys):
    fake_run(tmp_path, "resnet20_fp32", 1, val_seed=1, device="cpu")
    fake_run(tmp_path, "resnet20_fp32", 2, data_dir="/elsewhere", device="cuda")
    assert summarize.main([str(tmp_path)]) == 0
    assert "| resnet20_fp32 | 2 | 32 | - | 81.50 ± 0.50 |" in capsys.readouterr().out


@pytest.mark.parametrize("tool", ["summarize", "plot"])
@pytest.mark.parametrize("damage,message", [
    ("stray", "seed1.bak: not a run folder (expected seed<k>)"),
    ("no-config", "final.json without config.yaml")])
def test_damaged_sweeps_are_one_line(tool, damage, message, tmp_path, capsys):
    fake_run(tmp_path, "resnet20_fp32", 1)
    if damage == "stray":
        fake_run(tmp_path / "x", "resnet20_fp32", 1).rename(tmp_path / "resnet20_fp32" /
                                                             "seed1.bak")
    else:
        fake_run(tmp_path, "resnet20_fp32", 2).joinpath("config.yaml").unlink()
    main = summarize.main if tool == "summarize" else plot.main
    extra = [] if tool == "summarize" else ["--out", str(tmp_path / "fig")]
    assert main([str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_plot_draws_two_sweeps_of_other_epochs_as_two_series(tmp_path):
    fake_run(tmp_path / "cifar10_cpu", "resnet20_fp32", 1, epochs=30)
    fake_run(tmp_path / "cifar10_cpu", "resnet20_fp32", 2, epochs=30)
    fake_run(tmp_path / "cifar10_cpu_60ep", "resnet20_fp32", 1, epochs=60)
    points, _, _ = plot.collect([tmp_path / "cifar10_cpu", tmp_path / "cifar10_cpu_60ep"])
    assert dict(points["FP32 [cifar10_cpu]"]) == {32: [81.0, 82.0]}
    assert dict(points["FP32 [cifar10_cpu_60ep]"]) == {32: [81.0]}
    assert "FP32" not in points


def test_plot_refuses_a_seed_counted_twice(tmp_path, capsys):
    for sweep in ("a", "b"):  # two copies of one sweep: the same recipe, seed 1 twice
        fake_run(tmp_path / sweep, "resnet20_fp32", 1)
    assert plot.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "seed 1 appears twice" in err


def test_mean_std_is_the_population_std():
    assert records.mean_std([1.0, 3.0]) == (2.0, 1.0)  # the sample std would be 1.41
    assert records.format_mean_std([1.0, 3.0]) == "2.00 ± 1.00" and "population" in \
        records.STD_LABEL


def test_archived_logs_lose_machine_paths(tmp_path):
    folder = tmp_path / "runs" / "resnet20_fp32" / "seed1"
    text = (f"$ {sys.executable} {ROOT}/train_cifar10.py --config {ROOT}/experiments/x.yaml "
            f"--output-dir {folder} --data-dir /data/cifar --init-from /m/fp32/last.pt\n"
            f"run {folder}: resnet20\n$ python /snap/code/train_mnist.py --resume /r/last.pt\n")
    assert records.portable_log(text, folder) == (
        "$ python train_cifar10.py --config experiments/x.yaml --output-dir RUN --data-dir DIR "
        "--init-from SOURCE\nrun RUN: resnet20\n$ python train_mnist.py --resume RUN/last.pt\n")


def test_archived_logs_lose_another_interpreter_and_snapshot():
    """A queue's interpreter and code snapshot are not this process's: both go too."""
    text = ("$ /home/u/venv/bin/python /home/u/snap/train_cifar10.py --seed 1\n"
            "$ /opt/py3 /home/u/snap/experiments/run.py experiments/cifar10_200ep\n"
            "epoch 1/200 lr 0.1 | see /home/u/notes.py\n")
    assert records.portable_log(text, "/x/run") == (
        "$ python train_cifar10.py --seed 1\n$ python experiments/run.py experiments/cifar10_200ep\n"
        "epoch 1/200 lr 0.1 | see /home/u/notes.py\n")
