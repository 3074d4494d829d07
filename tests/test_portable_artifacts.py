"""Shipped artifacts (pretrained/, results/, docs/, README.md) record no machine's paths.

A path such as ``/root/data/cifar10`` or ``/home/<name>/runs/.../last.pt`` in a committed
file names a machine nobody else has. Text files are scanned as text; binary model files
by what they record: the JSON header of a packed ``.rqp`` file and every string (keys
included) inside a torch checkpoint. Images are skipped.
"""
import re
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from ringq.checkpoint import safe_load
from ringq.packing import _FormatError, _read_packed

SCANNED = ("pretrained", "results", "docs", "README.md")
IMAGES = {".png", ".jpg", ".jpeg", ".gif", ".svg", ".pdf"}
CHECKPOINTS = {".pt", ".pth"}
PACKED = {".rqp"}

# an absolute home or temp path: at the start of a path (not inside a relative one)
MACHINE_PATH = re.compile(
    r"(?<![\w.~-])(?:/root/|/home/[A-Za-z0-9_][\w.-]*|/tmp/|/Users/|/var/folders/)"
    r"|(?<![A-Za-z0-9])[A-Z]:\\")


def _shown(match, text):
    """The whole path-like token around ``match``, for the failure message."""
    start = match.start()
    end = re.compile(r"[^\s\"'`,;)\]}>]*").match(text, start).end()
    return text[start:end][:160]


def _in_text(text):
    return [_shown(m, text) for m in MACHINE_PATH.finditer(text)]


def _strings(obj, where=""):
    """(where, string) of every string in a nested dict / list / tuple / set."""
    if isinstance(obj, str):
        yield where, obj
    elif isinstance(obj, bytes):
        yield where, obj.decode("latin-1")
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _strings(key, f"{where}<key>")
            yield from _strings(value, f"{where}.{key}" if where else str(key))
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for i, value in enumerate(obj):
            yield from _strings(value, f"{where}[{i}]")


def _in_object(obj):
    return [f"{where} = {found}" for where, text in _strings(obj) for found in _in_text(text)]


def machine_paths(path):
    """The machine paths ``path`` records: ['<where> = <path>', ...] for model files,
    ['line N: <path>', ...] for text; [] when clean (and for images)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in IMAGES:
        return []
    if suffix in PACKED:
        try:
            header, _ = _read_packed(path)
        except _FormatError as e:
            raise AssertionError(f"{path}: unreadable packed file ({e})") from None
        return _in_object(header)
    if suffix in CHECKPOINTS:
        return _in_object(safe_load(path))
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:  # another binary: whatever bytes it holds
        return _in_text(data.decode("latin-1"))
    return [f"line {text.count(chr(10), 0, m.start()) + 1}: {_shown(m, text)}"
            for m in MACHINE_PATH.finditer(text)]


def _shipped():
    files = []
    for name in SCANNED:
        top = ROOT / name
        files += [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
    return [p for p in files if "__pycache__" not in p.parts]


SHIPPED = _shipped()


def _id(path):
    return str(path.relative_to(ROOT))


def test_scans_every_kind_of_artifact():
    names = {_id(p) for p in SHIPPED}
    assert "README.md" in names
    for top in ("pretrained/", "results/", "docs/"):
        assert any(n.startswith(top) for n in names), top
    suffixes = {p.suffix for p in SHIPPED}
    assert {".rqp", ".pt", ".json", ".yaml", ".txt", ".md", ".csv"} <= suffixes


@pytest.mark.parametrize("path", SHIPPED, ids=_id)
def test_records_no_machine_path(path):
    found = machine_paths(path)
    assert not found, f"{_id(path)} records machine paths: " + "; ".join(found)


# --- the scanner itself ------------------------------------------------------------

@pytest.mark.parametrize("planted", [
    "/root/data/cifar10", "/home/alice/runs/seed1/last.pt", "/tmp/cifar10-jpeg-data",
    "/Users/bob/ringq/best.pt", "/var/folders/xy/T/run", "C:\\Users\\bob\\best.pt",
])
def test_scanner_finds_a_planted_path_in_text(tmp_path, planted):
    clean = "$ python train_cifar10.py --data-dir DIR --output-dir RUN\nepoch 1/30 | 12.3s\n"
    (tmp_path / "log.txt").write_text(clean)
    assert machine_paths(tmp_path / "log.txt") == []
    (tmp_path / "final.json").write_text('{\n  "acc": 84.6,\n  "checkpoint": "%s"\n}\n'
                                         % planted.replace("\\", "\\\\"))
    found = machine_paths(tmp_path / "final.json")
    assert len(found) == 1 and found[0].startswith("line 3: ") and planted[:3] in found[0]


def test_scanner_leaves_relative_and_placeholder_paths_alone(tmp_path):
    text = ("init_from: ../../../cifar10_cpu/resnet20_fp32/seed1/last.pt\n"
            "python experiments/run.py --output-root RUNS/cifar10_cpu runs/tmp/x ~/tmp/y\n"
            "checkpoint: pretrained/resnet20_fp32_cifar10.pt, a/root/b, re: \\d+\n")
    (tmp_path / "notes.md").write_text(text)
    assert machine_paths(tmp_path / "notes.md") == []


def test_scanner_reads_a_checkpoint_recursively(tmp_path):
    clean = {"config": {"init_from": "pretrained/x.pt", "schedule": [15, 22]},
             "model": {"w": torch.zeros(2)}}
    torch.save(clean, tmp_path / "clean.pt")
    assert machine_paths(tmp_path / "clean.pt") == []
    planted = {"config": {"schedule": [15, 22], "runs": [{"output_dir": "/home/alice/run"}]},
               "model": {"w": torch.zeros(2)}}
    torch.save(planted, tmp_path / "planted.pt")
    assert machine_paths(tmp_path / "planted.pt") == [
        "config.runs[0].output_dir = /home/alice/run"]


def test_scanner_reads_a_packed_header(tmp_path):
    from models import build_model
    from ringq.packing import export_packed

    config = dict(model="lenet", quantization="ring", ring_size=4, ring_layout="distinct")
    torch.manual_seed(0)
    model = build_model(config).eval()
    export_packed(model, config, tmp_path / "clean.rqp", extra={"source_checkpoint": "best.pt"})
    assert machine_paths(tmp_path / "clean.rqp") == []
    export_packed(model, config, tmp_path / "planted.rqp",
                  extra={"source_checkpoint": "/tmp/runs/seed1/best.pt"})
    # the header is zlib-compressed: the path is not in the raw bytes, only in the header
    assert b"/tmp/" not in (tmp_path / "planted.rqp").read_bytes()
    assert machine_paths(tmp_path / "planted.rqp") == [
        "extra.source_checkpoint = /tmp/runs/seed1/best.pt"]
