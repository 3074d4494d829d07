"""Checkpoint I/O: atomic saving, and loading that treats files as data, never as code."""
import io
import os
import pickle
import stat
import zipfile

import pytest
import torch

from ringq.atomic import remove_stale_temps, save_atomic, write_text_atomic
from ringq.checkpoint import load_model_from_checkpoint, safe_load
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


def test_meta_records_dataset_and_data_dir(tmp_path):
    path = save_checkpoint(tmp_path / "x.pt", MLP, {"dataset": "mnist", "data_dir": "/d"})
    _, config, meta = load_model_from_checkpoint(path)
    assert config == MLP and (meta["dataset"], meta["data_dir"]) == ("mnist", "/d")

