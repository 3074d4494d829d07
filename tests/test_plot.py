"""experiments/plot.py draws both figures from a small runs tree made here."""
import csv
import json
import struct
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import plot  # noqa: E402
from ringq.train import METRIC_FIELDS  # noqa: E402

RUNS = {  # config: (config keys, final accuracy per mode, seeds)
    "resnet20_fp32": ({"quantization": "none"}, {"fp32": 80.0}, (1, 2)),
    "resnet20_ring4_kbit": ({"quantization": "ring", "ring_size": 4, "ring_layout": "distinct"},
                            {"soft": 79.0, "hard": 79.0}, (1, 2)),
    "resnet20_ring4": ({"quantization": "ring", "ring_size": 4, "ring_layout": "published"},
                       {"soft": 60.0, "hard": 10.0}, (1,)),
    "resnet20_uniform2": ({"quantization": "uniform", "bits": 2}, {"hard": 78.0}, (1,)),
}


def _png_size(path):
    """(width, height) from a PNG's IHDR; asserts the signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def make_runs(root):
    for config, (keys, accuracy, seeds) in RUNS.items():
        for seed in seeds:
            folder = root / config / f"seed{seed}"
            folder.mkdir(parents=True)
            (folder / "config.yaml").write_text(yaml.safe_dump({"model": "resnet20", **keys}))
            final = {"accuracy": {m: a + seed / 10 for m, a in accuracy.items()}}
            (folder / "final.json").write_text(json.dumps(final))
            with open(folder / "metrics.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
                writer.writeheader()
                for epoch in range(1, 6):
                    writer.writerow({"epoch": epoch, "train_loss": 2.0 / epoch,
                                     "eval_acc": 10 * epoch + seed,
                                     "eval_hard_acc": 9 * epoch if "soft" in accuracy else ""})
    ptq = {"accuracy": {"hard": 79.5}, "ptq": {"bits": 8, "scale": "mse"}}
    (root / "resnet20_fp32" / "seed1" / "eval_ptq8.json").write_text(json.dumps(ptq))
    best = {**ptq, "accuracy": {"hard": 70.0}}  # of best.pt: not a point of the final model
    (root / "resnet20_fp32" / "seed1" / "eval_best_ptq8.json").write_text(json.dumps(best))
    return root


def test_points_of_each_method(tmp_path):
    points, curves, subjects = plot.collect([make_runs(tmp_path / "runs")])
    assert subjects == {"resnet20 on cifar10"}
    assert points["FP32"][32] == [80.1, 80.2]
    assert points["ring k-bit"][2.0] == [79.1, 79.2]
    assert points["ring published, hard"][2.0] == [10.1]
    assert points["LSQ QAT"][2] == [78.1] and points["PTQ"][8] == [79.5]
    assert len(curves["resnet20_fp32"]) == 2


def test_close_up_holds_the_top_points(tmp_path):
    points, _, _ = plot.collect([make_runs(tmp_path / "runs")])
    lo, hi = plot.zoom_limits(points)
    assert hi == pytest.approx(80.15 + 0.05 + 0.5)  # the top of the FP32 band, plus margin
    assert hi - lo == pytest.approx(0.5 + plot.ZOOM_SPAN)
    assert lo < 79.15 < hi and not lo < 10.1 < hi  # k-bit shown, published hard left out
    points["LSQ QAT"][4] = [81.0]  # a point above the FP32 band sets the top
    assert plot.zoom_limits(points)[1] == pytest.approx(81.5)


def test_figures_are_pngs_of_sensible_size(tmp_path):
    out = tmp_path / "figures"
    assert plot.main([str(make_runs(tmp_path / "runs")), "--out", str(out)]) == 0
    for name in plot.FIGURES:
        width, height = _png_size(out / name)
        assert width >= 600 and height >= 400
        assert (out / name).stat().st_size > 20_000


@pytest.mark.parametrize("args,message", [
    (["{missing}"], "no such folder"), (["{empty}"], "no finished runs"),
    (["{runs}", "--curves", "nope"], "no runs of nope")])
def test_bad_input_is_one_line(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    runs = make_runs(tmp_path / "runs")
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "runs": runs}
    assert plot.main([a.format(**paths) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_two_configs_of_one_point_are_refused(tmp_path, capsys):
    """A lever config beside its row would be averaged into the row's point as a seed."""
    runs = make_runs(tmp_path / "runs")
    lever = runs / "resnet20_ring4_kbit_sigma1" / "seed1"
    lever.mkdir(parents=True)
    (lever / "config.yaml").write_text(yaml.safe_dump(
        {"model": "resnet20", "quantization": "ring", "ring_size": 4, "ring_layout": "distinct",
         "sigma": 1.0}))
    (lever / "final.json").write_text(json.dumps({"accuracy": {"soft": 70.0, "hard": 70.0}}))
    assert plot.main([str(runs), "--out", str(tmp_path / "fig")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "resnet20_ring4_kbit, resnet20_ring4_kbit_sigma1" in err and "'ring k-bit' at 2" in err
    assert not (tmp_path / "fig").exists()


def test_warm_started_and_distilled_runs_are_their_own_methods():
    cfg = {"quantization": "ring", "ring_size": 4, "ring_layout": "distinct"}
    final = {"accuracy": {"soft": 80.0, "hard": 80.0}}
    assert plot.run_points({**cfg, "distill_from": "t.pt"}, final) == [
        ("ring k-bit, distilled", 2.0, 80.0)]
    assert plot.run_points({"quantization": "uniform", "bits": 2, "init_from": "f.pt"},
                           final) == [("LSQ QAT, FP32 init", 2, 80.0)]
    assert {"ring k-bit, distilled", "LSQ QAT, distilled"} <= set(plot.STYLE)
