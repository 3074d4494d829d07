"""Bit packing, the packed file format and export.py."""
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from models import build_model
from models.ring_math import hard_indices, ring_values, snap_to_ring
from models.utils import ring_layers, set_weight_mode, uniform_layers
from packed_helpers import join, split, with_header
from ringq.checkpoint import load_model_from_checkpoint
from ringq.errors import CheckpointError
from ringq.packing import (CODECS, entropy_bits, export_packed, is_packed_file, level_indices,
                           level_table, load_packed, pack_bits, rewrite_extra, size_report,
                           unpack_bits, value_entropy_bits)
from ringq.runtime import run_cli
from run_helpers import exit_code, save_checkpoint

PRETRAINED = sorted((Path(__file__).resolve().parents[1] / "pretrained").glob("*.rqp"))

pytest_plugins = ["run_helpers"]
RESNET_RING4 = dict(model="resnet20", quantization="ring", ring_size=4, ring_layout="distinct")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread is faster


# --- bit packing --------------------------------------------------------------

@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 7, 13, 1001])
def test_pack_round_trip(bits, count):
    rng = np.random.default_rng(bits * 10_000 + count)
    indices = torch.from_numpy(rng.integers(0, 1 << bits, count))
    data = pack_bits(indices, bits)
    assert len(data) == (count * bits + 7) // 8
    assert torch.equal(unpack_bits(data, bits, count), indices)
    assert pack_bits(indices.to(torch.uint8), bits) == data


def test_pack_bit_order_is_little_endian():
    assert pack_bits(torch.tensor([1, 0, 1]), 1) == bytes([0b101])
    assert pack_bits(torch.tensor([3, 1, 2]), 2) == bytes([0b100111])
    assert pack_bits(torch.tensor([0xA, 0x5, 0xF]), 4) == bytes([0x5A, 0x0F])
    assert pack_bits(torch.tensor([0b101, 0b011, 0b110]), 3) == bytes([0b10011101, 0b1])


@pytest.mark.parametrize("indices, bits", [
    (torch.tensor([0, 4]), 2),              # out of range
    (torch.tensor([-1, 0]), 2),             # negative
    (torch.tensor([[0, 1]]), 1),            # not 1-D
    (torch.tensor([0.0, 1.0]), 1),          # not integer
    (torch.tensor([0, 1]), 0),              # bits too small
    (torch.tensor([0, 1]), 9),              # bits too large
    (torch.tensor([0, 1]), True),           # not an int
])
def test_pack_rejects_bad_input(indices, bits):
    with pytest.raises(ValueError):
        pack_bits(indices, bits)


@pytest.mark.parametrize("data, bits, count", [
    (b"\x00", 2, 5),        # too short
    (b"\x00\x00", 2, 4),    # too long
    (b"", 9, 0),            # bad bits
    (b"", 1, -1),           # bad count
])
def test_unpack_rejects_bad_input(data, bits, count):
    with pytest.raises(ValueError):
        unpack_bits(data, bits, count)


# --- level tables and positions -------------------------------------------------

def test_level_table_of_published_ring4():
    levels, ring_indices, level_of = level_table(ring_values(4))
    assert levels.tolist() == [-1.0, np.float32(1 / 3)]
    assert ring_indices.tolist() == [0, 1]
    assert level_of.tolist() == [0, 1, 1, 0]


def test_level_table_separates_bit_patterns():
    ring = torch.tensor([0.0, -0.0, 1.0, np.nextafter(np.float32(1), np.float32(2))])
    levels, _, level_of = level_table(ring)
    assert len(levels) == 4 and sorted(level_of.tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("counts, bits", [
    ([5, 5, 5, 5], 2.0), ([7, 0, 0, 0], 0.0), ([1, 1], 1.0), ([2, 2, 0, 0, 2, 2, 0, 0], 2.0),
    ([3, 1], 0.75 * np.log2(4 / 3) + 0.25 * 2),
])
def test_entropy_bits(counts, bits):
    assert entropy_bits(counts) == pytest.approx(bits, abs=1e-12)
    assert np.copysign(1.0, entropy_bits(counts)) == 1.0


def test_value_entropy_merges_one_value_stored_twice():
    third = np.float32(1 / 3)
    levels = [-1.0, third, np.nextafter(third, np.float32(1)), 1.0]
    assert value_entropy_bits(levels, [2, 1, 1, 0]) == pytest.approx(1.0)
    assert value_entropy_bits([-1.0, -0.5, 0.5, 1.0], [1, 1, 1, 1]) == pytest.approx(2.0)


def test_level_indices_follow_sorted_levels():
    layer = ring_layers(build_model(dict(model="mlp", quantization="ring", ring_size=4,
                                         ring_layout="distinct")))[0][1]
    with torch.no_grad():
        layer.positions.zero_()
        layer.positions.view(-1)[:7] = torch.tensor([0, 0, 1, 2, 3, 3, 3]) / 4
    levels, ring_indices, indices = level_indices(layer)
    assert levels.tolist() == [-0.75, -0.25, 0.25, 0.75]
    assert ring_indices.tolist() == [0, 3, 1, 2]
    assert indices[:7].tolist() == [0, 0, 2, 3, 1, 1, 1] and indices.size == layer.positions.numel()
    assert (indices[7:] == 0).all()


def test_index_positions_round_back():
    for n in range(2, 257):
        index = torch.arange(n)
        assert torch.equal(hard_indices(index.to(torch.float32) / n, n), index), n


# --- model round trips -----------------------------------------------------------

def _random_model(config, seed=0):
    """A ring model in hard + eval mode with random positions (some outside [0, 1]) and BN stats."""
    torch.manual_seed(seed)
    model = build_model(config)
    with torch.no_grad():
        for _, layer in ring_layers(model):
            layer.positions.uniform_(-0.2, 1.2)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
                m.num_batches_tracked.fill_(123)
    set_weight_mode(model, "hard")
    return model.eval()


def _batch(config):
    if config["model"].startswith("resnet"):
        return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def _bits(tensor):
    return tensor.detach().view(torch.int32)


def _logits(model, config):
    with torch.no_grad():
        return model(_batch(config))


@pytest.fixture(scope="module")
def resnet_ring4(tmp_path_factory):
    """(source model, packed path, export stats) for ResNet-20 ring-4 distinct."""
    model = _random_model(RESNET_RING4)
    path = tmp_path_factory.mktemp("packed") / "resnet20_ring4.rqp"
    stats = export_packed(model, RESNET_RING4, path, extra={"best_accuracy": 91.5})
    return model, path, stats


@pytest.mark.parametrize("config, bits", [
    (dict(RESNET_RING4), 2),
    (dict(model="resnet20", quantization="ring", ring_size=4), 1),
    (dict(model="resnet20", quantization="ring", ring_size=8), 2),
    (dict(model="lenet", quantization="ring", ring_size=8, ring_layout="distinct"), 3),
    (dict(RESNET_RING4, fp32_first_layer=True), 2),
    (dict(model="mlp", quantization="ring", ring_size=16, ring_type="sin",
          ring_layout="distinct", num_classes=7), 4),
    (dict(model="mlp", quantization="ring", ring_size=256, ring_layout="distinct"), 8),
])
def test_round_trip_is_exact_in_hard_mode(tmp_path, config, bits):
    model = _random_model(config)
    path = tmp_path / "model.rqp"
    stats = export_packed(model, config, path, extra={"epoch": 3})
    loaded, loaded_config, extra = load_packed(path)
    assert loaded_config == config and extra == {"epoch": 3}
    assert not loaded.training
    assert all(layer.quantizer.mode == "hard" for _, layer in ring_layers(loaded))
    assert set(stats["bits_per_layer"].values()) == {bits}
    assert torch.equal(_logits(loaded, config), _logits(model, config))
    for (_, a), (_, b) in zip(ring_layers(model), ring_layers(loaded)):
        assert torch.equal(a.ring_template, b.ring_template)
        assert torch.equal(_bits(snap_to_ring(a.positions, a.ring_template)),
                           _bits(snap_to_ring(b.positions, b.ring_template)))
        assert b.positions.shape == a.positions.shape


def test_per_layer_rings_kept_bit_exact(tmp_path):
    config = dict(model="mlp", quantization="ring", ring_size=4, ring_layout="distinct")
    model = _random_model(config)
    (_, first), (_, second) = ring_layers(model)
    first.ring_template.copy_(torch.tensor([-0.0, 0.5, 1.0, -1.0]))
    second.ring_template.copy_(torch.tensor([0.0, 0.5, 1.0, -1.0]))
    export_packed(model, config, tmp_path / "m.rqp")
    loaded, _, _ = load_packed(tmp_path / "m.rqp")
    for (_, a), (_, b) in zip(ring_layers(model), ring_layers(loaded)):
        assert torch.equal(_bits(a.ring_template), _bits(b.ring_template))
    assert torch.equal(_logits(loaded, config), _logits(model, config))


def test_half_stores_float16(tmp_path, resnet_ring4):
    model, full_path, _ = resnet_ring4
    path = tmp_path / "half.rqp"
    stats = export_packed(model, RESNET_RING4, path, half=True)
    loaded, _, _ = load_packed(path)
    assert size_report(model, path)["half"] is True
    assert stats["file_bytes"] < full_path.stat().st_size
    expected = _random_model(RESNET_RING4)
    ring_keys = {k for k in expected.state_dict() if k.endswith(("positions", "ring_template"))}
    with torch.no_grad():
        for key, tensor in expected.state_dict().items():
            if tensor.is_floating_point() and key not in ring_keys:
                tensor.copy_(tensor.half().float())
    assert torch.equal(_logits(loaded, RESNET_RING4), _logits(expected, RESNET_RING4))


def test_half_refuses_values_beyond_float16(tmp_path):
    model = _random_model(RESNET_RING4)
    model.bn1.running_var[0] = 1e6
    with pytest.raises(ValueError, match="float16"):
        export_packed(model, RESNET_RING4, tmp_path / "x.rqp", half=True)


def test_size_report_resnet20_ring4(resnet_ring4):
    model, path, stats = resnet_ring4
    report = size_report(model, path)
    assert report["file_bytes"] == stats["file_bytes"] == path.stat().st_size <= 90_000
    assert report["quantized_layers_ratio"] == 16
    assert report["quantized_weights"] == sum(m.positions.numel() for _, m in ring_layers(model))
    fp32 = build_model(dict(RESNET_RING4, quantization="none"))
    assert report["fp32_state_dict_bytes"] == 4 * sum(t.numel() for t in fp32.state_dict().values())
    assert report["ratio"] == report["fp32_state_dict_bytes"] / report["file_bytes"]
    assert set(report["bits_per_layer"].values()) == {2}
    assert all(len(levels) == 4 for levels in report["levels_per_layer"].values())
    for name, layer in ring_layers(model):
        counts = report["level_counts_per_layer"][name]
        values = snap_to_ring(layer.positions, layer.ring_template)
        assert counts == [int((values == v).sum()) for v in report["levels_per_layer"][name]]
        assert report["entropy_bits_per_layer"][name] == entropy_bits(counts)
        assert 1.9 < report["entropy_bits_per_layer"][name] <= 2
    entropy = report["entropy_bits_per_layer"]
    assert report["quantized_entropy_bits"] == pytest.approx(
        sum(entropy[name] * m.positions.numel() for name, m in ring_layers(model)))
    assert report["quantized_entropy_bits"] <= report["quantized_bits"]


def test_size_report_refuses_other_model(resnet_ring4):
    _, path, _ = resnet_ring4
    with pytest.raises(CheckpointError, match="do not match"):
        size_report(_random_model(dict(RESNET_RING4, model="resnet32")), path)


def test_export_refuses_fp32_model_and_wrong_config(tmp_path):
    with pytest.raises(ValueError, match="nothing to pack"):
        export_packed(build_model(dict(model="mlp", quantization="none")),
                      dict(model="mlp", quantization="none"), tmp_path / "x.rqp")
    with pytest.raises(ValueError, match="config"):
        export_packed(_random_model(RESNET_RING4), dict(RESNET_RING4, ring_size=8),
                      tmp_path / "x.rqp")
    assert list(tmp_path.iterdir()) == []


def test_export_replaces_atomically(tmp_path, resnet_ring4):
    model, _, _ = resnet_ring4
    path = tmp_path / "model.rqp"
    path.write_bytes(b"old")
    export_packed(model, RESNET_RING4, path)
    assert is_packed_file(path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.rqp"]


def test_export_leaves_random_stream_alone(tmp_path, resnet_ring4):
    state = torch.get_rng_state()
    export_packed(resnet_ring4[0], RESNET_RING4, tmp_path / "m.rqp")
    assert torch.equal(torch.get_rng_state(), state)


def test_is_packed_file(tmp_path, resnet_ring4):
    assert is_packed_file(resnet_ring4[1])
    other = tmp_path / "other.pt"
    other.write_bytes(b"PK\x03\x04 not packed")
    assert not is_packed_file(other)
    assert not is_packed_file(tmp_path / "missing.rqp")


def test_loader_never_unpickles(monkeypatch, resnet_ring4):
    def refuse(*args, **kwargs):
        raise AssertionError("the packed loader must not unpickle")
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    model, _, _ = load_packed(resnet_ring4[1])
    assert torch.equal(_logits(model, RESNET_RING4), _logits(resnet_ring4[0], RESNET_RING4))


# --- malformed files -------------------------------------------------------------

def _record(header, name):
    return next(r for r in header["tensors"] if r["name"] == name)


def _set(record, **fields):
    record.update(fields)


def _flip_payload_byte(data):
    out = bytearray(data)
    out[-5] ^= 0x10
    return bytes(out)


CORRUPTIONS = {
    "empty": (lambda d: b"", "empty file"),
    "wrong magic": (lambda d: b"RINGQPK2" + d[8:], "bad magic"),
    "torch zip": (lambda d: b"PK\x03\x04" + d[4:], "bad magic"),
    "prefix only": (lambda d: d[:10], "truncated"),
    "truncated header": (lambda d: d[:40], "truncated"),
    "truncated payload": (lambda d: d[:len(d) // 2], "truncated"),
    "bad zlib": (lambda d: d[:14] + bytes([d[14] ^ 0xFF]) + d[15:], "corrupt header"),
    "bad json": (lambda d: join(b'{"format": "ringq-packed", "vers', split(d)[1]),
                 "corrupt header"),
    "header not a dict": (lambda d: join(b"[1, 2]", split(d)[1]), "not a JSON object"),
    "flipped payload byte": (_flip_payload_byte, "sha256"),
    "future version": (lambda d: with_header(d, lambda h: _set(h, version=3)), "version"),
    "no sha": (lambda d: with_header(d, lambda h: h.pop("payload_sha256") and None),
               "payload_sha256"),
    "offset out of range": (lambda d: with_header(
        d, lambda h: _set(_record(h, "bn1.weight"), offset=10 ** 9)), "outside"),
    "negative offset": (lambda d: with_header(
        d, lambda h: _set(_record(h, "bn1.weight"), offset=-4)), "outside"),
    "nbytes mismatch": (lambda d: with_header(
        d, lambda h: _set(_record(h, "bn1.weight"), nbytes=4)), "expected"),
    "unknown dtype": (lambda d: with_header(
        d, lambda h: _set(_record(h, "bn1.weight"), dtype="object")), "unknown dtype"),
    "unknown kind": (lambda d: with_header(
        d, lambda h: _set(_record(h, "bn1.weight"), kind="pickle")), "unknown kind"),
    "shape mismatch": (lambda d: with_header(
        d, lambda h: _set(_record(h, "bn1.weight"), shape=[4, 4])), "does not match"),
    "config mismatch": (lambda d: with_header(
        d, lambda h: _set(h["config"], model="resnet32")), "missing tensors"),
    "ring size mismatch": (lambda d: with_header(
        d, lambda h: _set(h["config"], ring_size=8)), "does not match"),
    "bad config": (lambda d: with_header(
        d, lambda h: _set(h["config"], model="vgg")), "config: model: invalid value 'vgg'"),
    "missing tensor": (lambda d: with_header(
        d, lambda h: _set(h, tensors=h["tensors"][:-1])), "missing tensors"),
    "duplicate tensor": (lambda d: with_header(
        d, lambda h: _set(h, tensors=h["tensors"] + h["tensors"][-1:])), "stored twice"),
    "raw positions": (lambda d: with_header(
        d, lambda h: _set(_record(h, "bn1.weight"), name="conv1.positions")),
        "unexpected raw tensor"),
    "not a ring layer": (lambda d: with_header(
        d, lambda h: _set(_record(h, "conv1"), name="bn1")), "not a ring layer"),
    "level index out of range": (lambda d: with_header(
        d, lambda h: _set(_record(h, "conv1"), levels=[-0.75], ring_indices=[0])),
        "level index out of range"),
    "level not on ring": (lambda d: with_header(
        d, lambda h: _set(_record(h, "conv1"), ring_indices=[1, 0, 2, 3])), "levels differ"),
    "level not float32": (lambda d: with_header(
        d, lambda h: _record(h, "conv1")["levels"].__setitem__(0, 0.1)), "float32"),
    "too many bits": (lambda d: with_header(
        d, lambda h: _set(_record(h, "conv1"), bits=9)), "bits"),
    "missing ring": (lambda d: with_header(
        d, lambda h: _set(_record(h, "conv1"), ring=5)), "not stored"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_malformed_files_are_refused(tmp_path, resnet_ring4, corruption):
    make, reason = CORRUPTIONS[corruption]
    path = tmp_path / "bad.rqp"
    path.write_bytes(make(resnet_ring4[1].read_bytes()))
    with pytest.raises(CheckpointError, match=reason) as info:
        load_packed(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read"):
        load_packed(tmp_path / "missing.rqp")


def test_unedited_rewrite_still_loads(tmp_path, resnet_ring4):
    """The corruption helpers themselves produce loadable files when they change nothing."""
    path = tmp_path / "same.rqp"
    path.write_bytes(with_header(resnet_ring4[1].read_bytes(), lambda h: None))
    load_packed(path)


# --- export.py --------------------------------------------------------------------

@pytest.fixture
def export_cli(monkeypatch):
    """The export module, whose load_model_from_checkpoint the tests replace."""
    import export
    return export


BEST = {"accuracy": 90.1, "split": "val", "epoch": 5, "mode": "hard"}
META = {"source": "ringq", "dataset": "cifar10", "epoch": 7, "source_file": None,
        "recorded_best": {**BEST, "of": "this run"}}


def _use_model(monkeypatch, export, model, config):
    def load(path, map_location="cpu"):
        return model, config, META
    monkeypatch.setattr(export, "load_model_from_checkpoint", load)


def _export(export_cli, *argv):
    """Exit status of ``export.py ARGV``, run as its entry point runs it."""
    return exit_code(run_cli, export_cli.main, list(argv))


def test_cli_exports_and_reports(monkeypatch, tmp_path, capsys, export_cli, resnet_ring4):
    model = resnet_ring4[0]
    _use_model(monkeypatch, export_cli, model, RESNET_RING4)
    out, report = tmp_path / "m.rqp", tmp_path / "m.json"
    assert _export(export_cli, "--checkpoint", "/runs/seed1/src.pt", "--output", str(out),
                   "--json", str(report)) == 0
    printed = capsys.readouterr().out
    numbers = json.loads(report.read_text())
    assert "file bytes" in printed and "16.00x" in printed and "21 layers at 2 bits" in printed
    entropy = numbers["quantized_entropy_bits"] / numbers["quantized_weights"]
    assert f"level entropy:         {entropy:.2f} bits per quantized weight (stored at 2.00)" \
        in printed
    assert numbers["file_bytes"] == out.stat().st_size
    assert numbers["quantized_layers_ratio"] == 16
    loaded, _, extra = load_packed(out)
    assert extra == {"dataset": "cifar10", "source": {"file": "src.pt", "epoch": 7, "best": BEST}}
    assert torch.equal(_logits(loaded, RESNET_RING4), _logits(model, RESNET_RING4))
    _, _, meta = load_model_from_checkpoint(out)
    assert meta == {"source": "packed", "dataset": "cifar10", "epoch": 7, "source_file": "src.pt",
                    "recorded_best": {**BEST, "of": "source checkpoint"}}


def test_cli_half_and_quiet(monkeypatch, tmp_path, capsys, export_cli, resnet_ring4):
    _use_model(monkeypatch, export_cli, resnet_ring4[0], RESNET_RING4)
    out = tmp_path / "m.rqp"
    assert _export(export_cli, "--checkpoint", "src.pt", "--output", str(out), "--half",
                   "--quiet") == 0
    assert capsys.readouterr().out == ""
    assert out.stat().st_size < resnet_ring4[1].stat().st_size


def test_cli_refuses_fp32_model(monkeypatch, tmp_path, capsys, export_cli):
    config = dict(model="mlp", quantization="none")
    _use_model(monkeypatch, export_cli, build_model(config), config)
    assert _export(export_cli, "--checkpoint", "fp32.pt", "--output", str(tmp_path / "x")) == 2
    err = capsys.readouterr().err
    assert err == ("error: nothing to pack: fp32.pt has no quantized layers (pass --bits K to "
                   "quantize an FP32 checkpoint)\n")


def test_cli_reports_user_errors_in_one_line(monkeypatch, tmp_path, capsys, export_cli,
                                             resnet_ring4):
    def broken(path, map_location="cpu"):
        raise CheckpointError(f"{path}: not a checkpoint")
    monkeypatch.setattr(export_cli, "load_model_from_checkpoint", broken)
    assert _export(export_cli, "--checkpoint", "bad.pt", "--output", str(tmp_path / "x")) == 2
    assert capsys.readouterr().err == "error: bad.pt: not a checkpoint\n"
    _use_model(monkeypatch, export_cli, resnet_ring4[0], RESNET_RING4)
    missing_dir = tmp_path / "no" / "x.rqp"
    assert _export(export_cli, "--checkpoint", "a.pt", "--output", str(missing_dir)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {missing_dir}") and err.count("\n") == 1


def test_cli_packs_upstream_checkpoint(tmp_path, capsys, upstream_dir, export_cli):
    """With the original files and the real loader: the packed model predicts identically."""
    from ringq.checkpoint import load_model_from_checkpoint
    source = upstream_dir / "best_ResNet20_ring4.pth"
    out = tmp_path / "ring4.rqp"
    assert _export(export_cli, "--checkpoint", str(source), "--output", str(out), "--quiet") == 0
    model, config, _ = load_model_from_checkpoint(source)
    set_weight_mode(model, "hard")
    loaded, _, _ = load_packed(out)
    assert torch.equal(_logits(loaded, config), _logits(model.eval(), config))
    # The original ring-4 buffer holds 3 distinct float32 values (two differ in the last
    # bit), so a bit-exact packing needs 2 bits there, not 1.
    assert size_report(model, out)["quantized_layers_ratio"] >= 16


# --- uniform K-bit models ----------------------------------------------------------

def _random_uniform(config, seed=0):
    """A uniform model with trained-looking steps (some weights clipped) and random BN stats."""
    torch.manual_seed(seed)
    model = build_model(config)
    with torch.no_grad():
        for _, layer in uniform_layers(model):
            layer.step.mul_(torch.empty_like(layer.step).uniform_(0.3, 3.0))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("config", [
    dict(model="lenet", quantization="uniform", bits=2),
    dict(model="lenet", quantization="uniform", bits=4, fp32_first_layer=True),
    dict(model="mlp", quantization="uniform", bits=3, num_classes=7),
    dict(model="mlp", quantization="uniform", bits=8),
    dict(model="resnet20", quantization="uniform", bits=2),
], ids=["lenet2", "lenet4-fp32-first", "mlp3", "mlp8", "resnet20-2"])
def test_uniform_round_trip_is_exact(tmp_path, config):
    model = _random_uniform(config)
    path = tmp_path / "model.rqp"
    stats = export_packed(model, config, path)
    loaded, loaded_config, _ = load_packed(path)
    bits = config["bits"]
    assert loaded_config == config and set(stats["bits_per_layer"].values()) == {bits}
    assert torch.equal(_logits(loaded, config), _logits(model, config))
    for (_, a), (_, b) in zip(uniform_layers(model), uniform_layers(loaded)):
        with torch.no_grad():  # equal values (a weight rounded to 0 may read -0.0 in the source)
            assert torch.equal(a.quantized_weight(), b.quantized_weight())
        assert torch.equal(a.step, b.step) and torch.equal(a.integers(), b.integers())
    report = size_report(model, path)
    assert report["quantized_layers_ratio"] == 32 / bits
    weights = sum(m.weight.numel() for _, m in uniform_layers(model))
    assert report["quantized_weights"] == weights
    fp32 = build_model({**config, "quantization": "none"})
    assert report["fp32_state_dict_bytes"] == 4 * sum(t.numel() for t in fp32.state_dict().values())
    for name, layer in uniform_layers(model):
        assert report["levels_per_layer"][name] == list(range(-2 ** (bits - 1), 2 ** (bits - 1)))
        counts = report["level_counts_per_layer"][name]
        integers = layer.integers().reshape(-1) + 2 ** (bits - 1)
        assert counts == torch.bincount(integers, minlength=2 ** bits).tolist()
        assert 0 < report["entropy_bits_per_layer"][name] <= bits


def test_uniform_file_is_small(tmp_path):
    config = dict(model="lenet", quantization="uniform", bits=4)
    model = _random_uniform(config)
    stats = export_packed(model, config, tmp_path / "m.rqp")
    assert stats["packed_bytes"] == sum((m.weight.numel() * 4 + 7) // 8
                                        for _, m in uniform_layers(model))
    assert stats["file_bytes"] < stats["packed_bytes"] + stats["raw_bytes"] + 20_000


@pytest.fixture(scope="module")
def uniform_file(tmp_path_factory):
    config = dict(model="mlp", quantization="uniform", bits=3)
    path = tmp_path_factory.mktemp("uniform") / "mlp3.rqp"
    export_packed(_random_uniform(config), config, path)
    return path


UNIFORM_CORRUPTIONS = {
    "uniform in a version-1 file": (lambda h: _set(h, version=1), "unknown kind 'uniform'"),
    "steps missing": (lambda h: _record(h, "features.1").pop("steps") and None, "steps"),
    "steps of other length": (lambda h: _record(h, "features.1")["steps"].pop() and None,
                              "steps must be"),
    "step zero": (lambda h: _record(h, "features.1")["steps"].__setitem__(0, 0.0),
                  "steps must be"),
    "one bit": (lambda h: _set(_record(h, "features.1"), bits=1, nbytes=784 * 512 // 8),
                "uniform bits 1"),
    "uniform record for a BatchNorm": (lambda h: _set(_record(h, "features.1"), name="features.2"),
                                       "not a uniform layer"),
}


@pytest.mark.parametrize("corruption", UNIFORM_CORRUPTIONS)
def test_malformed_uniform_files_are_refused(tmp_path, uniform_file, corruption):
    edit, reason = UNIFORM_CORRUPTIONS[corruption]
    path = tmp_path / "bad.rqp"
    path.write_bytes(with_header(uniform_file.read_bytes(), edit))
    with pytest.raises(CheckpointError, match=reason):
        load_packed(path)


# --- export.py --model-only --------------------------------------------------------

def test_model_only_keeps_what_evaluates_and_drops_training_state(tmp_path, capsys):
    """The shipped FP32 file: same weights and record, no optimizer or paths; resuming it is
    refused, and its recorded best reads as the source run's."""
    from ringq.checkpoint import safe_load
    from ringq.train import _load_resume
    import export
    config = dict(model="resnet20", quantization="none")
    run = {"dataset": "cifar10", "data_dir": "/root/data", "output_dir": "/root/runs/x",
           "init_from": None}
    source = save_checkpoint(tmp_path / "best.pt", config, run, epoch=3,
                             best={"epoch": 3, "accuracy": 71.5, "mode": "fp32", "split": "val"})
    out = tmp_path / "resnet20_fp32.pt"
    assert _export(export, "--checkpoint", str(source), "--output", str(out)[:-3] + ".x",
                   "--model-only", "--bits", "8") == 2
    assert "takes neither --bits nor --half" in capsys.readouterr().err
    assert _export(export, "--checkpoint", str(source), "--output", str(out),
                   "--model-only") == 0
    assert f"{out.stat().st_size:,} bytes (model only" in capsys.readouterr().out
    stripped, full = safe_load(out), safe_load(source)
    assert set(stripped) == {"format", "version", "config", "model_config", "model", "epoch",
                             "best", "source"}
    assert stripped["config"] == {"dataset": "cifar10", "init_from": None}
    assert stripped["source"] == {"file": "best.pt"}
    assert all(torch.equal(stripped["model"][k], v) for k, v in full["model"].items())
    weight_bytes = sum(v.numel() * v.element_size() for v in full["model"].values())
    assert weight_bytes < out.stat().st_size < weight_bytes * 1.05  # about 1.1 MB
    model, loaded_config, meta = load_model_from_checkpoint(out)
    assert loaded_config == config and meta["source_file"] == "best.pt"
    assert meta["recorded_best"] == {"accuracy": 71.5, "split": "val", "epoch": 3,
                                     "mode": "fp32", "of": "source checkpoint"}
    assert load_model_from_checkpoint(source)[2]["recorded_best"]["of"] == "this run"
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        _load_resume(out, "cifar10")


def test_model_only_refuses_files_that_are_not_training_checkpoints(tmp_path, capsys):
    import export
    bare = tmp_path / "bare.pt"
    torch.save(build_model(dict(model="resnet20", quantization="none")).state_dict(), bare)
    assert _export(export, "--checkpoint", str(bare), "--output", str(tmp_path / "o.pt"),
                   "--model-only") == 2
    assert "not a training checkpoint of this project" in capsys.readouterr().err
    assert not (tmp_path / "o.pt").exists()


def test_model_only_refuses_a_packed_file_in_one_line(tmp_path, capsys, resnet_ring4):
    import export
    out = tmp_path / "o.pt"
    assert _export(export, "--checkpoint", str(resnet_ring4[1]), "--output", str(out),
                   "--model-only") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "IndexError" not in err
    assert "a packed file" in err and "--model-only takes the last.pt or best.pt" in err
    assert not out.exists()


def test_ptq_export_records_the_fp32_figure_as_the_source_s(tmp_path):
    """--bits K: the packed file's recorded best is the FP32 run's, labelled so."""
    import export
    config = dict(model="mlp", quantization="none")
    source = save_checkpoint(tmp_path / "best.pt", config, {"dataset": "fashion-mnist"},
                             epoch=26, best={"epoch": 26, "accuracy": 85.44, "mode": "fp32",
                                             "split": "val"})
    out = tmp_path / "mlp_int4.rqp"
    assert _export(export, "--checkpoint", str(source), "--output", str(out), "--bits", "4",
                   "--quiet") == 0
    _, _, extra = load_packed(out)
    assert extra == {"dataset": "fashion-mnist", "ptq_bits": 4, "ptq_scale": "mse",
                     "source": {"file": "best.pt", "epoch": 26,
                                "best": {"accuracy": 85.44, "split": "val", "epoch": 26,
                                         "mode": "fp32"}}}
    _, _, meta = load_model_from_checkpoint(out)
    assert meta["recorded_best"]["of"] == "source checkpoint"
    assert meta["ptq"] == {"bits": 4, "scale": "mse"}


# --- format stability, codecs and metadata rewrites ----------------------------------

@pytest.mark.parametrize("path", PRETRAINED, ids=lambda p: p.name)
def test_pretrained_files_re_export_to_the_same_bytes(tmp_path, path):
    """Existing files load unchanged; packing them again gives the same payload (and, for
    files of the current version, the same file)."""
    model, config, extra = load_packed(path)
    again = tmp_path / path.name
    export_packed(model, config, again, half=split(path.read_bytes())[0]["half"], extra=extra)
    (header, payload), (new_header, new_payload) = (split(p.read_bytes()) for p in (path, again))
    assert new_payload == payload
    if header["version"] == new_header["version"]:
        assert again.read_bytes() == path.read_bytes()
    else:  # version 1 (ring records only): the same records, now under version 2
        assert {**header, "version": 2} == new_header


def test_one_codec_per_quantized_layer_kind():
    assert set(CODECS) == {"packed", "uniform"}
    for codec in CODECS.values():
        for method in ("codes", "shape", "header_fields", "covers", "tensors"):
            assert callable(getattr(codec, method))
        assert codec.kind and codec.fields and codec.not_weights


def test_a_codec_removed_from_the_table_is_an_unknown_kind(monkeypatch, uniform_file):
    """The table alone decides which record kinds load: no branch elsewhere knows them."""
    import ringq.packing as packing
    monkeypatch.setattr(packing, "CODECS", {"packed": CODECS["packed"]})
    with pytest.raises(CheckpointError, match="unknown kind 'uniform'"):
        load_packed(uniform_file)


def test_rewrite_extra_keeps_payload_and_predictions(tmp_path, resnet_ring4, uniform_file):
    for source, config in ((resnet_ring4[1], RESNET_RING4),
                           (uniform_file, dict(model="mlp", quantization="uniform", bits=3))):
        path = tmp_path / source.name
        path.write_bytes(source.read_bytes())
        before, _, _ = load_packed(path)
        size = rewrite_extra(path, {"dataset": "cifar10", "source": {"file": "best.pt"}})
        assert size == path.stat().st_size
        after, loaded_config, extra = load_packed(path)
        assert loaded_config == config and extra == {"dataset": "cifar10",
                                                     "source": {"file": "best.pt"}}
        assert split(path.read_bytes())[1] == split(source.read_bytes())[1]
        old, new = split(source.read_bytes())[0], split(path.read_bytes())[0]
        assert {**old, "extra": None} == {**new, "extra": None}
        assert torch.equal(_logits(after, config), _logits(before, config))


def test_rewrite_extra_refuses_a_broken_file(tmp_path):
    path = tmp_path / "x.rqp"
    path.write_bytes(b"RINGQPK1 not really")
    with pytest.raises(CheckpointError, match="truncated"):
        rewrite_extra(path, {})
    assert path.read_bytes() == b"RINGQPK1 not really"


def test_old_extra_schema_still_loads(tmp_path, resnet_ring4):
    """Files written before the labelled schema: best_accuracy is the source's, split unknown;
    the recorded paths are not passed on."""
    path = tmp_path / "old.rqp"
    export_packed(resnet_ring4[0], RESNET_RING4, path, extra={
        "source": "ringq", "epoch": 57, "dataset": "cifar10", "data_dir": "/tmp/cifar10",
        "best_accuracy": 85.9, "source_checkpoint": "/root/runs/seed1/best.pt"})
    _, _, meta = load_model_from_checkpoint(path)
    assert meta == {"source": "packed", "dataset": "cifar10", "epoch": 57, "source_file": "best.pt",
                    "recorded_best": {"accuracy": 85.9, "split": None, "epoch": None,
                                      "mode": None, "of": "source checkpoint"}}


@pytest.mark.parametrize("best", [None, "high", {"accuracy": "85"}, {"accuracy": float("nan")},
                                  {"accuracy": -1.0}])
def test_malformed_recorded_best_reads_as_none(tmp_path, resnet_ring4, best):
    path = tmp_path / "x.rqp"
    extra = {"source": {"file": 3, "epoch": "7", "best": best}, "dataset": "svhn"}
    path.write_bytes(with_header(resnet_ring4[1].read_bytes(), lambda h: _set(h, extra=extra)))
    _, _, meta = load_model_from_checkpoint(path)
    assert meta["recorded_best"] is None and meta["epoch"] is None
    assert meta["source_file"] is None and meta["dataset"] is None
