"""bench/gpu_check.py: its commands, its refusal without a GPU, and (slow) its CPU dry run."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402


@pytest.mark.parametrize("compile_", [False, True])
def test_training_command_is_the_fast_setting(tmp_path, compile_):
    cmd = [str(c) for c in gpu_check.train_command("ring4_kbit", tmp_path, tmp_path / "run",
                                                   "cuda", compile_, dry_run=False)]
    assert cmd[1:4] == ["train_cifar10.py", "--config",
                        "experiments/cifar10/resnet20_ring4_kbit.yaml"]
    for flag, value in (("--epochs", "2"), ("--precision", "auto"), ("--val-split", "5000"),
                        ("--device", "cuda"), ("--ste-epochs", "0")):
        assert cmd[cmd.index(flag) + 1] == value
    assert "--channels-last" in cmd and ("--compile" in cmd) == compile_
    assert "--subset" not in cmd


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_refuses_without_a_gpu(tmp_path):
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--dry-run" in result.stderr


@pytest.mark.slow
def test_dry_run_passes_on_the_cpu(cifar_dir, tmp_path):
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--data-dir",
                             cifar_dir, "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["passed"] and report["dry_run"]
    assert set(report["runs"]) == {"fp32", "fp32_compiled", "ring4_kbit", "ring4_kbit_compiled"}
    for entry in report["runs"].values():
        assert len(entry["epoch_s"]) == 2 and entry["max_gpu_cpu_gap"] == 0
