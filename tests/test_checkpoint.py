"""Checkpoint I/O: atomic saving, and loading that treats files as data, never as code."""
import io
import os
import pickle
import stat
import zipfile

import pytest
import torch

from models import build_model
from models.utils import set_weight_mode
from ringq.atomic import remove_stale_temps, save_atomic, write_text_atomic
from ringq.checkpoint import (load_model_from_checkpoint, portable_config, rewrite_metadata,
                              safe_load)
from ringq.errors import CheckpointError, RingqError
from run_helpers import Payload, save_checkpoint

MLP = {"model": "mlp", "quantization": "ring", "ring_size": 4, "ring_type": "triangle",
       "ring_layout": "published", "interpolation": "gaussian", "sigma": None,
       "num_classes": 10, "in_channels": 1, "image_size": 28}


class Crash(BaseException):
    """Stands for the process dying in the middle of a write."""


def test_save_atomic_writes_a_loadable_public_file(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic({"w": torch.arange(3)}, path)
    assert torch.equal(safe_load(path)["w"], torch.arange(3))
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["last.pt"]


def test_crash_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic({"epoch": 1}, path)
    before = path.read_bytes()

    def dying_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise Crash()
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(Crash):
        save_atomic({"epoch": 2}, path)
    assert path.read_bytes() == before and safe_load(path) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["last.pt"]


def test_write_errors_are_one_line(tmp_path):
    with pytest.raises(RingqError, match="cannot write .*missing/x.csv: No such file"):
        write_text_atomic("a,b\n", tmp_path / "missing" / "x.csv")


def test_remove_stale_temps_only_removes_ours(tmp_path):
    for name in (".last.pt.abc123.tmp", ".metrics.csv.x.tmp", "last.pt", ".other.tmp"):
        (tmp_path / name).write_text("x")
    remove_stale_temps(tmp_path, ("last.pt", "metrics.csv"))
    assert sorted(os.listdir(tmp_path)) == [".other.tmp", "last.pt"]


def _zip_with_pickle(path, payload):
    """A torch zip archive whose data.pkl is replaced by a plain pickle of ``payload``."""
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(path, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            target.writestr(item, pickle.dumps(payload, protocol=2)
                            if item.filename.endswith("data.pkl") else data)


def _flip_middle(data):
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + data[middle + 64:]


def make_bad_file(kind, path, marker, good):
    """Write the bad checkpoint ``kind`` to ``path``; ``good`` is a valid file's bytes."""
    writers = {
        "empty": lambda: path.write_bytes(b""),
        "random": lambda: path.write_bytes(bytes(range(7, 250)) * 40),
        "text": lambda: path.write_text("not a checkpoint\n"),
        "truncated": lambda: path.write_bytes(good[:len(good) // 2]),
        "header-only": lambda: path.write_bytes(good[:100]),
        "bit-flipped": lambda: path.write_bytes(_flip_middle(good)),
        "code-torch-save": lambda: torch.save({"model": Payload(marker)}, path),
        "code-raw-pickle": lambda: path.write_bytes(pickle.dumps(Payload(marker))),
        "code-in-zip": lambda: _zip_with_pickle(path, Payload(marker)),
    }
    writers[kind]()
    return path


BAD_FILES = {  # kind -> fragment of the one-line error
    "empty": "empty file",
    "random": "not a readable checkpoint",
    "text": "not a readable checkpoint",
    "truncated": "truncated or corrupt",
    "header-only": "truncated or corrupt",
    "bit-flipped": "checksum mismatch",
    "code-torch-save": "refused: loading it would call io.open",
    "code-raw-pickle": "refused: a raw pickle stream",
    "code-in-zip": "refused: loading it would call io.open",
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_files_are_refused_without_running_code(tmp_path, kind):
    good = tmp_path / "good.pt"
    save_checkpoint(good, MLP)
    marker = tmp_path / "MARKER"
    path = make_bad_file(kind, tmp_path / f"{kind}.pt", marker, good.read_bytes())
    for load in (safe_load, load_model_from_checkpoint):
        with pytest.raises(CheckpointError) as info:
            load(path)
        message = str(info.value)
        assert "\n" not in message and message.startswith(str(path))
        assert BAD_FILES[kind] in message
    assert not marker.exists()


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p, "no such file"),
    (lambda p: p.mkdir() or p, "not a file"),
])
def test_missing_and_directory(tmp_path, make, fragment):
    with pytest.raises(CheckpointError, match=fragment):
        safe_load(make(tmp_path / "x.pt"))


def test_weights_of_another_architecture(tmp_path):
    path = save_checkpoint(tmp_path / "x.pt", {**MLP, "model": "lenet"})
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_config"] = MLP
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="weights do not fit the model"):
        load_model_from_checkpoint(path)


def test_meta_records_dataset_not_the_data_dir(tmp_path):
    path = save_checkpoint(tmp_path / "x.pt", MLP, {"dataset": "mnist", "data_dir": "/d"})
    _, config, meta = load_model_from_checkpoint(path)
    assert config == MLP and meta["dataset"] == "mnist" and "data_dir" not in meta


@pytest.mark.parametrize("best, recorded", [
    ({"epoch": 57, "accuracy": 85.9, "mode": "hard", "split": "val"},
     {"accuracy": 85.9, "split": "val", "epoch": 57, "mode": "hard", "of": "this run"}),
    ({"epoch": 4, "accuracy": 70.0},  # written before mode and split were recorded
     {"accuracy": 70.0, "split": None, "epoch": 4, "mode": None, "of": "this run"}),
    ({"epoch": 0, "accuracy": -1.0}, None),  # no epoch finished yet
])
def test_recorded_best_is_labelled(tmp_path, best, recorded):
    path = save_checkpoint(tmp_path / "last.pt", MLP, {"dataset": "mnist"}, epoch=60, best=best)
    _, _, meta = load_model_from_checkpoint(path)
    assert meta["recorded_best"] == recorded and meta["epoch"] == 60
    assert "best_accuracy" not in meta and meta["source"] == "ringq"


def test_portable_config_drops_machine_paths():
    config = {"dataset": "cifar10", "data_dir": "/root/data", "output_dir": "runs/x",
              "init_from": "/root/runs/fp32/best.pt", "distill_from": "/tmp/t.pt", "seed": 1}
    assert portable_config(config) == {"dataset": "cifar10", "seed": 1}
    relative = {"data_dir": "../data", "init_from": "pretrained/f.pt", "distill_from": None}
    assert portable_config(relative) == relative


def _logits(model):
    set_weight_mode(model, "hard")
    with torch.no_grad():
        return model.eval()(torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)))


def test_rewrite_metadata_keeps_weights_and_predictions(tmp_path):
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "best.pt", MLP, {"dataset": "mnist", "data_dir": "/d"},
                           sigma=0.25)
    before_model, _, _ = load_model_from_checkpoint(path)
    before = safe_load(path)
    rewrite_metadata(path, {"config": portable_config(before["config"]),
                            "source": {"file": "best.pt"}, "history": None})
    after = safe_load(path)
    assert after["config"] == {"dataset": "mnist"} and after["source"] == {"file": "best.pt"}
    assert "history" not in after and after["sigma"] == 0.25
    assert after["model"].keys() == before["model"].keys()
    for key, tensor in before["model"].items():
        assert after["model"][key].dtype == tensor.dtype
        assert torch.equal(after["model"][key].view(-1).view(torch.uint8),
                           tensor.view(-1).view(torch.uint8)), key
    after_model, _, _ = load_model_from_checkpoint(path)
    assert torch.equal(_logits(after_model), _logits(before_model))


def test_rewrite_metadata_refuses_weights_and_other_files(tmp_path):
    path = save_checkpoint(tmp_path / "best.pt", MLP)
    with pytest.raises(ValueError, match="not the weights"):
        rewrite_metadata(path, {"model": {}})
    bare = tmp_path / "bare.pt"
    torch.save(build_model(MLP).state_dict(), bare)
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        rewrite_metadata(bare, {"config": {}})


def test_state_dict_of_non_tensors_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "x.pt", MLP)
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"] = {**ckpt["model"], "features.2.weight": [1.0, 2.0]}
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="not all tensors"):
        load_model_from_checkpoint(path)
