"""Smoke test of bench/bench.py --quick: it runs, and its JSON holds finite positive numbers."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RATIOS = ("train_step_ratio", "interp_memory_ratio", "interp_memory_ratio_with_table_build",
          "naive_interp_memory_ratio", "data_path_speedup")
GROUPS = {"train_step_ms": {"ring", "fp32"},
          "interp_memory_bytes": {"positions", "soft", "soft_cold", "naive"},
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
    assert result["quick"] is True
    assert result["environment"]["device"] == "cpu"
    assert set(result["targets"]) == {"train_step_ratio", "interp_memory_ratio",
                                      "data_path_speedup"}
