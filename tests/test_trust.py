"""Untrusted model configs: a file's config is checked before any model is built.

A packed header's ``config`` or a training checkpoint's ``model_config`` declaring
``num_classes: 2**40`` once made ``evaluate.py`` ask for hundreds of terabytes; now
the value is refused in one line, and so is any in-range value whose shapes do not
match the stored tensors, with no model built.
"""
import subprocess
import sys

import pytest
import torch

import ringq.checkpoint
import ringq.packing
from models import build_model
from packed_helpers import rewrite_header
from ringq import config as config_lib
from ringq.checkpoint import infer_config, load_model_from_checkpoint
from ringq.errors import CheckpointError
from ringq.packing import export_packed, load_packed
from ringq.trust import check_model_config, check_shapes, meta_model
from run_helpers import ENV, ROOT, save_checkpoint

LENET = {"model": "lenet", "quantization": "ring", "ring_size": 4, "ring_type": "triangle",
         "ring_layout": "distinct", "interpolation": "gaussian", "sigma": None,
         "num_classes": 10, "in_channels": 1, "image_size": 28}
MLP_FP32 = {"model": "mlp", "quantization": "none", "num_classes": 10, "in_channels": 1,
            "image_size": 28}
HUGE = 2 ** 40


@pytest.mark.parametrize("config", [
    LENET, MLP_FP32,
    {"model": "resnet20", "quantization": "uniform", "bits": 2, "num_classes": 10,
     "in_channels": 3, "image_size": 32},
    {"model": "resnet20", "quantization": "ring", "ring_size": 8, "sigma": 0.0845,
     "fp32_first_layer": True},
    {"model": "mlp", "quantization": "ring", "ring_size": 256, "sigma": 4},
    config_lib.model_config({o.name: o.default for o in config_lib.OPTIONS}, 10, 3, 32),
])
def test_valid_configs_pass_unchanged(config):
    assert check_model_config(dict(config), "f") == config


@pytest.mark.parametrize("config, fragment", [
    ([1, 2], "f is not a mapping (got list)"),
    ({**LENET, "depth": 20}, "unknown key 'depth'"),
    ({**LENET, "num_classes": HUGE}, f"num_classes: must be an integer in 1..100000, got {HUGE}"),
    ({**LENET, "num_classes": True}, "num_classes: must be an integer"),
    ({**LENET, "num_classes": 0}, "num_classes: must be an integer in 1..100000, got 0"),
    ({**LENET, "in_channels": HUGE}, "in_channels: must be an integer in 1..64"),
    ({**LENET, "image_size": 10.5}, "image_size: must be an integer in 1..4096"),
    ({**LENET, "ring_size": HUGE}, f"ring_size: must be between 2 and 256, got {HUGE}"),
    ({**LENET, "ring_size": "4"}, "ring_size: must be int, got '4'"),
    ({**LENET, "ring_size": None}, "ring_size: must be set"),
    ({**LENET, "sigma": float("nan")}, "sigma: must be a finite number, got nan"),
    ({**LENET, "sigma": float("inf")}, "sigma: must be a finite number"),
    ({**LENET, "sigma": -1.0}, "sigma: must be > 0, got -1.0"),
    ({**LENET, "sigma": "0.5"}, "sigma: must be a finite number, got '0.5'"),
    ({**LENET, "model": "vgg"}, "model: invalid value 'vgg'; choose from resnet20"),
    ({**LENET, "ring_type": "hexagon"}, "ring_type: invalid value 'hexagon'"),
    ({**LENET, "interpolation": 3}, "interpolation: must be str, got 3"),
    ({**LENET, "fp32_first_layer": 1}, "fp32_first_layer: must be bool, got 1"),
    ({**MLP_FP32, "quantization": "uniform", "bits": 9}, "bits: must be between 2 and 8"),
    ({**MLP_FP32, "quantization": "uniform"}, "missing bits (a uniform model needs it)"),
    ({k: v for k, v in LENET.items() if k != "ring_size"}, "missing ring_size"),
    ({k: v for k, v in LENET.items() if k != "model"}, "missing model"),
    ({**LENET, "model": "x" * 10_000}, "x" * 50 + "..."),
])
def test_invalid_configs_are_one_line_errors(config, fragment):
    with pytest.raises(CheckpointError) as info:
        check_model_config(config, "f")
    message = str(info.value)
    assert fragment in message and message.startswith("f") and "\n" not in message
    assert len(message) < 300


def test_meta_model_allocates_nothing():
    model = meta_model({**LENET, "num_classes": HUGE}, "f")
    weight = model.state_dict()["classifier.weight"]
    assert weight.device.type == "meta" and tuple(weight.shape) == (HUGE, 500)


def test_meta_model_reports_an_unbuildable_config():
    with pytest.raises(CheckpointError, match="f cannot build a model"):
        meta_model({"model": "mlp", "quantization": "ring"}, "f")


def test_inferred_upstream_configs_pass():
    ring = build_model({"model": "resnet20", "quantization": "ring", "ring_size": 8})
    fp32 = build_model({"model": "resnet20", "quantization": "none"})
    for model in (ring, fp32):
        config = infer_config(model.state_dict())
        assert check_model_config(dict(config), "f") == config


@pytest.mark.parametrize("stored, fragment", [
    ({"a": (2,)}, "missing b"),
    ({"a": (2,), "b": (3,), "c": (1,)}, "unexpected c"),
    ({"a": (2,), "b": (4,)}, "b: stored shape [4], the config implies [3]"),
])
def test_check_shapes(stored, fragment):
    check_shapes({"a": (2,), "b": (3,)}, {"a": (2,), "b": (3,)}, "f")
    with pytest.raises(CheckpointError, match=r"f: weights do not fit the model \(") as info:
        check_shapes({"a": (2,), "b": (3,)}, stored, "f")
    assert fragment in str(info.value)


# --- crafted files -------------------------------------------------------------------

@pytest.fixture
def never_build(monkeypatch):
    """Loading must refuse before any real model is built: building one fails the test."""
    def refuse(config):
        raise AssertionError(f"a model was built for {config}")
    monkeypatch.setattr(ringq.packing, "build_model", refuse)
    monkeypatch.setattr(ringq.checkpoint, "build_model", refuse)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("trust") / "lenet.rqp"
    export_packed(build_model(LENET).eval(), LENET, path)
    return path


CRAFTED = {  # header config change -> fragment of the error
    "huge num_classes": ({"num_classes": HUGE}, "config: num_classes: must be an integer"),
    "huge in_channels": ({"in_channels": HUGE}, "config: in_channels: must be an integer"),
    "huge ring_size": ({"ring_size": HUGE}, "config: ring_size: must be between 2 and 256"),
    "huge image_size": ({"image_size": HUGE}, "config: image_size: must be an integer"),
    "classes beyond the records": ({"num_classes": 50_000}, "classifier.weight: stored shape "
                                   "[10, 500] does not match the model's [50000, 500]"),
    "channels beyond the records": ({"in_channels": 64}, "features.0.positions: stored shape"),
    "image beyond the records": ({"image_size": 4096}, "features.9.positions: stored shape "
                                 "[500, 800] does not match the model's [500, 52122050]"),
    "ring beyond the records": ({"ring_size": 256}, "features.0.ring_template: stored shape "
                                "[4] does not match the model's [256]"),
}


@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_packed_config_is_refused_before_building(tmp_path, packed, never_build, case):
    change, fragment = CRAFTED[case]
    path = rewrite_header(packed, tmp_path / "crafted.rqp", lambda h: h["config"].update(change))
    with pytest.raises(CheckpointError) as info:
        load_packed(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and fragment in message and "\n" not in message


def test_unedited_crafted_file_still_loads(tmp_path, packed):
    load_packed(rewrite_header(packed, tmp_path / "same.rqp", lambda h: None))


def _checkpoint_with(tmp_path, change):
    """A training checkpoint of MLP_FP32 whose model_config is then edited by ``change``."""
    path = save_checkpoint(tmp_path / "last.pt", MLP_FP32)
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_config"] = {**ckpt["model_config"], **change}
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("change, fragment", [
    ({"num_classes": HUGE}, "model config: num_classes: must be an integer in 1..100000"),
    ({"in_channels": HUGE}, "model config: in_channels: must be an integer in 1..64"),
    ({"quantization": "ring", "ring_size": HUGE}, "model config: ring_size: must be between"),
    ({"num_classes": 50_000}, "weights do not fit the model (classifier.weight: stored shape "
                              "[10, 256], the config implies [50000, 256])"),
    ({"image_size": 2048}, "features.1.weight: stored shape [512, 784], the config implies "
                           "[512, 4194304]"),
])
def test_crafted_model_config_is_refused_before_building(tmp_path, never_build, change,
                                                         fragment):
    path = _checkpoint_with(tmp_path, change)
    with pytest.raises(CheckpointError) as info:
        load_model_from_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and fragment in message and "\n" not in message


@pytest.mark.parametrize("kind", ["packed", "checkpoint"])
def test_evaluate_refuses_a_huge_config_in_one_line(tmp_path, packed, kind):
    """The reported failure: 30 lines of RuntimeError after trying to allocate 600 TB."""
    if kind == "packed":
        path = rewrite_header(packed, tmp_path / "huge.rqp",
                              lambda h: h["config"].update(num_classes=HUGE))
    else:
        path = _checkpoint_with(tmp_path, {"num_classes": HUGE})
    result = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(path),
                             "--data-dir", str(tmp_path / "nowhere"), "--no-download"],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {path}: ") and "num_classes" in result.stderr
