"""experiments/park.py: an unfinished run parked without machine paths, restored on another
folder, resumes to exactly the run that was never interrupted; and the runs parked in
in_flight/ are the runs their sweep's configs ask for."""
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

from ringq import identity
from ringq import train as train_lib
from ringq.checkpoint import safe_load
from ringq.config import with_recorded_split
from run_helpers import run_differences, save_checkpoint, tiny_args, train_main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import park  # noqa: E402
import run as runner  # noqa: E402

pytest_plugins = ["run_helpers"]
pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
EPOCHS = ("--epochs", 4, "--schedule", 2)
MLP = {"model": "mlp", "quantization": "none", "num_classes": 10, "in_channels": 1,
       "image_size": 28}
PARKED = sorted((ROOT / "in_flight").glob("*/*/seed*/last.pt"))


class Stop(Exception):
    """Raised by the patched checkpoint writer: the machine going away after an epoch."""


def interrupted_run(data, out, after_epoch):
    """A tiny run in ``out`` that stopped once its ``last.pt`` of ``after_epoch`` was saved."""
    real_save = train_lib.save_atomic

    def save(obj, path):
        real_save(obj, path)
        if Path(path).name == "last.pt" and obj["epoch"] == after_epoch:
            raise Stop

    with mock.patch.object(train_lib, "save_atomic", save), pytest.raises(Stop):
        train_lib.main("mnist", [str(a) for a in tiny_args(data, out, *EPOCHS)])
    return out


def run_park(*args):
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "park.py"),
                           *map(str, args)], capture_output=True, text=True, timeout=120)


def test_parked_run_resumes_exactly_elsewhere(idx_data, tmp_path):
    reference = tmp_path / "reference"
    assert train_main("mnist", tiny_args(idx_data, reference, *EPOCHS)) == 0
    sweep = tmp_path / "machine_a" / "sweep"
    interrupted_run(idx_data, sweep / "lenet_ring8" / "seed1", after_epoch=2)
    shutil.copytree(reference, sweep / "lenet_fp32" / "seed1")  # a finished run: not parked
    result = run_park(sweep, tmp_path / "parked")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "lenet_ring8 seed 1: parked at epoch 2"
    parked = tmp_path / "parked" / "lenet_ring8" / "seed1"
    assert not (tmp_path / "parked" / "lenet_fp32").exists()
    for path in parked.iterdir():
        assert str(tmp_path).encode() not in path.read_bytes(), path.name
    last = safe_load(parked / "last.pt")
    assert (parked / "best.pt").is_file() == (last["best"]["epoch"] != 2)

    machine_b = tmp_path / "machine_b" / "sweep"
    result = run_park("--restore", tmp_path / "parked", machine_b)
    assert result.returncode == 0 and result.stdout.strip() == \
        "lenet_ring8 seed 1: restored at epoch 2", result.stderr
    run = machine_b / "lenet_ring8" / "seed1"
    assert safe_load(run / "best.pt")["epoch"] == last["best"]["epoch"]
    assert train_main("mnist", ["--resume", run / "last.pt", "--data-dir", idx_data]) == 0
    assert run_differences(reference, run) == []

    again = run_park("--restore", tmp_path / "parked", machine_b)  # finished there: kept
    assert again.stdout.strip() == f"lenet_ring8 seed 1: kept (finished in {machine_b})"
    assert run_park(machine_b, tmp_path / "parked").stdout.strip() == \
        "lenet_ring8 seed 1: finished, removed from " + str(tmp_path / "parked")
    assert not (tmp_path / "parked" / "lenet_ring8").exists()


def test_a_best_checkpoint_of_another_epoch_is_parked(tmp_path):
    folder, target = tmp_path / "run" / "m" / "seed1", tmp_path / "parked"
    folder.mkdir(parents=True)
    config = {"model": "mlp", "data_dir": str(tmp_path / "data"), "output_dir": str(folder)}
    save_checkpoint(folder / "last.pt", MLP, config, epoch=5, best={"epoch": 3, "accuracy": 1})
    save_checkpoint(folder / "best.pt", MLP, config, epoch=3, best={"epoch": 3, "accuracy": 1})
    assert park.park_run(folder, target) == 5
    assert safe_load(target / "best.pt")["epoch"] == 3
    assert all(str(tmp_path) not in repr(safe_load(target / name)["config"])
               for name in ("last.pt", "best.pt"))


def test_restore_never_moves_a_run_back(tmp_path):
    for root, epoch in (("parked", 2), ("runs", 3)):
        (tmp_path / root / "m" / "seed1").mkdir(parents=True)
        save_checkpoint(tmp_path / root / "m" / "seed1" / "last.pt", MLP, epoch=epoch)
    result = run_park("--restore", tmp_path / "parked", tmp_path / "runs")
    assert result.stdout.strip() == f"m seed 1: kept (at epoch 3 in {tmp_path / 'runs'})"
    assert safe_load(tmp_path / "runs" / "m" / "seed1" / "last.pt")["epoch"] == 3


def test_park_names_a_missing_folder(tmp_path):
    result = run_park(tmp_path / "nowhere", tmp_path / "dest")
    assert result.returncode == 2 and "no such folder" in result.stderr


@pytest.mark.parametrize("last", PARKED, ids=lambda p: "/".join(p.parts[-4:-1]))
def test_parked_runs_are_what_their_configs_ask_for(last):
    sweep, config, seed = last.parts[-4], last.parts[-3], int(last.parts[-2][4:])
    recorded = with_recorded_split(safe_load(last)["config"])
    assert not any(isinstance(v, str) and v.startswith("/") for v in recorded.values())
    config_path = ROOT / "experiments" / sweep / f"{config}.yaml"
    args = runner.get_args_parser().parse_args([str(config_path.parent)])
    requested = runner.requested_config(config_path, seed, last.parent, args)
    assert identity.run_fingerprint(recorded) == identity.run_fingerprint(requested)
    on_disk = yaml.safe_load((last.parent / "config.yaml").read_text())
    assert on_disk["fingerprint"] == recorded["fingerprint"]
