"""Smoke test of bench/bench.py --quick: it runs, and its JSON holds finite positive numbers."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RATIOS = ("train_step_ratio", "fast_step_fraction", "interp_memory_ratio",
          "interp_memory_ratio_with_table_build", "naive_interp_memory_ratio", "data_path_speedup",
          "fast_epoch_s")
SETTINGS = {"fp32_nchw", "fast"}
NESTED = ("train_step_ms", "epoch_s", "projected_200_epoch_min")
GROUPS = {"interp_memory_bytes": {"positions", "soft", "soft_cold", "naive"},
          "data_images_per_s": {"memory", "torchvision"},
          "eval_images_per_s": {"soft", "hard", "fp32"}}


def _positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_bench_writes_json(tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "bench/bench.py", "--quick", "--device", "cpu",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train step" in proc.stdout and "torch" in proc.stdout
    result = json.loads(out.read_text())
    for key in RATIOS:
        assert _positive(result[key]), (key, result[key])
    for key, names in GROUPS.items():
        assert set(result[key]) == names, key
        assert all(_positive(v) for v in result[key].values()), (key, result[key])
    for key in NESTED:
        assert set(result[key]) == SETTINGS, key
        for per_model in result[key].values():
            assert set(per_model) == {"ring", "fp32"} and all(map(_positive, per_model.values()))
    assert result["projected_200_epoch_min"]["fast"]["ring"] == pytest.approx(
        200 * result["epoch_s"]["fast"]["ring"] / 60)
    assert result["epoch_images"] == {"train": 256, "val": 64}
    assert result["fast_precision"] in {"bf16", "fp32"}
    assert result["quick"] is True
    assert result["environment"]["device"] == "cpu"
    assert set(result["targets"]) == {"train_step_ratio", "fast_step_fraction", "fast_epoch_s",
                                      "interp_memory_ratio", "data_path_speedup"}
