"""ONNX export (ringq/onnx_export.py): onnxruntime computes the PyTorch hard network, with
the quantized weights stored at 2 / 4 / 8 bits and dequantized exactly."""
import math

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import ROOT  # noqa: E402
from run_helpers import run_script, tiny_args, train_main  # noqa: E402
from models import build_model  # noqa: E402
from models.utils import quantized_layers, set_weight_mode  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402
from ringq.data import ArrayDataset  # noqa: E402
from ringq.errors import CheckpointError, DataError, RingqError  # noqa: E402
from ringq.onnx_export import (FORMAT, FORMAT_KEY, OPSET, OnnxClassifier,  # noqa: E402
                               check_onnx_file, evaluate_onnx, export_checkpoint_onnx,
                               export_onnx, run_onnx)

pytest_plugins = ["run_helpers"]
CIFAR = (1, 3, 32, 32)
GREY = (1, 1, 28, 28)
RESNET = dict(model="resnet20", num_classes=10)
CASES = {  # name: (config, input shape, dataset, expected ONNX type of the quantized weights)
    "ring4": ({**RESNET, "quantization": "ring", "ring_size": 4, "ring_layout": "distinct"},
              CIFAR, None, "INT2"),
    "ring8": ({**RESNET, "quantization": "ring", "ring_size": 8, "ring_layout": "distinct"},
              CIFAR, None, "INT4"),
    "ring4_published": ({**RESNET, "quantization": "ring", "ring_size": 4}, CIFAR, None, "INT2"),
    "ring8_published_lenet": ({"model": "lenet", "quantization": "ring", "ring_size": 8},
                              GREY, "fashion-mnist", "UINT2"),
    "sin8_mlp": ({"model": "mlp", "quantization": "ring", "ring_size": 8, "ring_type": "sin",
                  "ring_layout": "distinct"}, GREY, "mnist", "UINT4"),
    "ring4_fp32_stem": ({**RESNET, "quantization": "ring", "ring_size": 4,
                         "ring_layout": "distinct", "fp32_first_layer": True}, CIFAR, None,
                        "INT2"),
    "ring2_lenet": ({"model": "lenet", "quantization": "ring", "ring_size": 2,
                     "ring_layout": "distinct"}, GREY, "fashion-mnist", "INT2"),  # 1 bit
    "uniform2": ({**RESNET, "quantization": "uniform", "bits": 2}, CIFAR, None, "INT2"),
    "uniform4_mlp": ({"model": "mlp", "quantization": "uniform", "bits": 4}, GREY, "mnist",
                     "INT4"),
    "uniform3_lenet": ({"model": "lenet", "quantization": "uniform", "bits": 3}, GREY,
                       "fashion-mnist", "INT4"),
    "uniform8_lenet": ({"model": "lenet", "quantization": "uniform", "bits": 8}, GREY,
                       "fashion-mnist", "INT8"),
    "fp32": ({**RESNET, "quantization": "none"}, CIFAR, None, None),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread is faster


@torch.no_grad()
def randomize_batchnorm(model, seed=1):
    """Trained-looking BatchNorm statistics, so the exported BatchNormalization is tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.weight.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.copy_(0.2 * torch.randn(n, generator=g))
            m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model


def make(name, seed=0):
    config, shape, dataset, kind = CASES[name]
    torch.manual_seed(seed)
    return randomize_batchnorm(build_model(config)).eval(), shape, dataset, kind


def reference_logits(model, x):
    set_weight_mode(model, "hard")
    with torch.no_grad():
        return model(torch.as_tensor(x)).numpy()


def quantized_initializers(proto):
    return {t.name: t for t in proto.graph.initializer if t.name.endswith(".weight.q")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name: (model in its original mode, input shape, path, report), each exported once."""
    out = {}
    folder = tmp_path_factory.mktemp("onnx")
    for name in CASES:
        model, shape, dataset, _ = make(name)
        path = folder / f"{name}.onnx"
        out[name] = (model, shape, path, export_onnx(model, path, shape, dataset))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_onnxruntime_equals_pytorch_hard_network(exported, name):
    model, shape, path, report = exported[name]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, *shape[1:], generator=g).numpy()
    ref = reference_logits(model, x)
    got = run_onnx(OnnxClassifier(path, threads=1), x)
    assert got.shape == ref.shape == (16, 10)
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    assert (got.argmax(1) == ref.argmax(1)).all()
    # uint8 images are normalised with the recorded mean / std, as the repository's loaders do
    images = torch.randint(0, 256, (5, *shape[1:]), generator=g, dtype=torch.uint8)
    mean, std = check_onnx_file(path)["mean"], check_onnx_file(path)["std"]
    normalised = ((images.float() / 255 - torch.tensor(mean).view(1, -1, 1, 1))
                  / torch.tensor(std).view(1, -1, 1, 1)).numpy()
    ref = reference_logits(model, normalised)
    got = run_onnx(path, images, threads=1)
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    assert (got.argmax(1) == ref.argmax(1)).all()


@pytest.mark.parametrize("name", list(CASES))
def test_quantized_weights_are_packed_with_the_expected_types(exported, name):
    model, _, path, report = exported[name]
    kind = CASES[name][3]
    proto = onnx.load(str(path))
    packed = quantized_initializers(proto)
    layers = quantized_layers(model)
    assert len(packed) == len(layers) == len(report["layers"])
    bits = {"INT2": 2, "UINT2": 2, "INT4": 4, "UINT4": 4, "INT8": 8}.get(kind)
    for (layer_name, layer), row in zip(layers, report["layers"]):
        tensor = packed[f"{layer_name}.weight.q"]
        assert TensorProto.DataType.Name(tensor.data_type) == kind == row["onnx_type"]
        assert row["bits"] == bits and report["bits_per_layer"][layer_name] == bits
        n = math.prod(layer.weight_shape)
        assert len(tensor.raw_data) == math.ceil(n * bits / 8)  # packed, not int32 varints
    fp32_weights = [t for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT
                    and t.name.endswith(".weight") and len(t.dims) > 1]
    # quantized layers keep no FP32 weight; the classifier (FP32 in every model) does
    assert {t.name for t in fp32_weights} == {n for n, p in model.named_parameters()
                                              if n.endswith(".weight") and p.dim() > 1
                                              and not n.rpartition(".")[0] in dict(layers)}


def test_forms_chosen_per_layer_kind(exported):
    forms = {name: {row["form"] for row in exported[name][3]["layers"]} for name in CASES}
    assert forms["ring4"] == {"scale+offset"}       # +-1/4, +-3/4: codes -2..1 * 1/2 + 1/4
    assert forms["ring8"] == {"scale"}              # +-1/8 .. +-7/8: odd codes * 1/8
    assert forms["sin8_mlp"] == {"table"}           # sin levels: index and Gather
    assert forms["uniform2"] == forms["uniform4_mlp"] == {"scale"}
    assert forms["ring2_lenet"] == {"scale"}        # +-1/2: codes -1, 1 * 1/2, in int2
    assert forms["fp32"] == set()
    stem = exported["ring4_fp32_stem"][3]["bits_per_layer"]
    assert "conv1" not in stem and len(stem) == 20  # the FP32 stem stays FP32
    ring4 = exported["ring4"][3]["layers"]
    assert all(row["levels"] == 4 and row["nominal_bits"] == 2 for row in ring4)
    assert exported["ring8"][3]["layers"][0]["nominal_bits"] == 3  # stored at 4: no int3


def _with_weight_outputs(path):
    """The file's model with every dequantized weight as an extra graph output."""
    proto = onnx.load(str(path))
    names = [t.name[:-2] for t in quantized_initializers(proto).values()]
    for name in names:
        proto.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return proto, names


@pytest.mark.parametrize("name", ["ring4", "ring8", "ring4_published", "ring8_published_lenet",
                                  "sin8_mlp", "uniform2", "uniform4_mlp", "uniform8_lenet"])
def test_dequantized_weights_equal_the_hard_weights_exactly(exported, name):
    model, shape, path, _ = exported[name]
    proto, names = _with_weight_outputs(path)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(names, {"images": np.zeros((1, *shape[1:]), np.float32)})
    set_weight_mode(model, "hard")
    got = dict(zip(names, outputs))
    for layer_name, layer in quantized_layers(model):
        with torch.no_grad():
            want = layer.quantized_weight().view(layer.weight_shape).numpy()
        w = got[f"{layer_name}.weight"]
        w = w if w.shape == want.shape else w.T  # a MatMul may hold it transposed
        assert np.array_equal(w, want), layer_name


def test_file_metadata_opset_and_single_file(exported, tmp_path):
    _, _, path, report = exported["ring4"]
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.producer_name == "ringq" and proto.ir_version == 13 == report["ir_version"]
    assert {o.domain: o.version for o in proto.opset_import}[""] == OPSET == 25
    props = {p.key: p.value for p in proto.metadata_props}
    assert props[FORMAT_KEY] == FORMAT and props["ringq.dataset"] == "cifar10"
    info = check_onnx_file(path)
    assert info["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])
    assert info["std"] == pytest.approx([0.2023, 0.1994, 0.2010])
    assert info["num_classes"] == 10 and (info["channels"], info["height"]) == (3, 32)
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.HasField("dim_value")  # dynamic batch
    assert not any(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(f"{n}.onnx" for n in CASES)
    assert "note" in report and "hard" in report["note"]  # built in soft mode
    assert "note" not in exported["uniform2"][3]
    kinds = report["bytes_by_kind"]
    assert sum(kinds.values()) == report["file_bytes"] == path.stat().st_size
    assert kinds["packed_lowbit_initializers"] > 0.75 * report["file_bytes"]


def test_sizes_against_the_fp32_export(exported):
    ring4, uniform2, fp32 = (exported[n][3] for n in ("ring4", "uniform2", "fp32"))
    assert ring4["file_bytes"] <= 95_000
    assert uniform2["file_bytes"] <= 100_000
    assert 1_000_000 <= fp32["file_bytes"] <= 1_200_000
    assert 1_000_000 <= ring4["fp32_onnx_bytes"] <= 1_200_000
    assert ring4["ratio"] == pytest.approx(ring4["fp32_onnx_bytes"] / ring4["file_bytes"])
    assert ring4["ratio"] >= 11 and uniform2["ratio"] >= 11
    assert 6 <= exported["ring8"][3]["ratio"] < 8  # 3-bit levels stored at 4 bits
    assert ring4["quantized_weights"] == 270_256
    # one 64x64x3x3 conv at 2 bits: 36,864 weights in 9,216 bytes (+ name and dims)
    big = [row for row in ring4["layers"] if row["shape"] == [64, 64, 3, 3]]
    assert big and all(row["packed_bytes"] == 9216 for row in big)


def test_no_fused_approximate_kernels(exported, tmp_path):
    """onnxruntime fuses DequantizeLinear(int4) -> MatMul into MatMulNBits, which quantizes the
    activations to int8; linear layers are written as Gemm, which it leaves alone."""
    for name in ("uniform4_mlp", "sin8_mlp", "ring8"):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{name}.opt.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(exported[name][2]), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
        ops = {(n.domain, n.op_type) for n in optimized.graph.node}
        assert not any("NBits" in op or "Integer" in op or op.startswith("QLinear")
                       for _, op in ops), ops


def test_evaluate_onnx_on_uint8_images(exported):
    model, shape, path, _ = exported["uniform4_mlp"]
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (37, *shape[1:]), generator=g, dtype=torch.uint8)
    mean, std = (0.1307,), (0.3081,)
    x = (images.float() / 255 - mean[0]) / std[0]
    labels = torch.as_tensor(reference_logits(model, x.numpy()).argmax(1))
    labels[:5] = (labels[:5] + 1) % 10  # five wrong on purpose
    result = evaluate_onnx(path, ArrayDataset(images, labels, [str(i) for i in range(10)]),
                           batch_size=8, threads=1, return_logits=True)
    assert (result["correct"], result["total"]) == (32, 37)
    assert result["accuracy"] == pytest.approx(100 * 32 / 37)
    assert result["logits"].shape == (37, 10)
    first = evaluate_onnx(path, ArrayDataset(images, labels, []), batch_size=8, limit=30,
                          threads=1)
    assert (first["correct"], first["total"]) == (25, 30)
    with pytest.raises(DataError, match="takes N x 1 x 28 x 28"):
        run_onnx(path, np.zeros((2, 3, 32, 32), np.float32))


def _one_line(excinfo):
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def test_foreign_onnx_file_is_refused(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "foreign",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 32, 32])])
    proto = helper.make_model(graph, producer_name="someone-else",
                              opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    path = tmp_path / "foreign.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(CheckpointError) as excinfo:
        check_onnx_file(path)
    assert "not an ONNX file written by ringq" in _one_line(excinfo)
    with pytest.raises(CheckpointError):
        run_onnx(path, np.zeros((1, 3, 32, 32), np.float32))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffnot a protobuf" * 10)
    with pytest.raises(CheckpointError) as excinfo:
        check_onnx_file(garbage)
    _one_line(excinfo)
    with pytest.raises(CheckpointError, match="no such file"):
        check_onnx_file(tmp_path / "missing.onnx")


def test_non_image_input_is_refused(tmp_path, exported):
    props = {p.key: p.value for p in onnx.load(str(exported["ring4"][2])).metadata_props}
    for shape in (["N", 10], ["N", 3, 32], ["N", 3, "H", 32]):
        graph = helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])], "flat",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
        proto = helper.make_model(graph, producer_name="ringq",
                                  opset_imports=[helper.make_opsetid("", OPSET)])
        proto.ir_version = 13
        helper.set_model_props(proto, props)
        path = tmp_path / "flat.onnx"
        onnx.save(proto, str(path))
        with pytest.raises(CheckpointError) as excinfo:
            check_onnx_file(path)
        assert "not a float32 image batch" in _one_line(excinfo)
    with pytest.raises(RingqError, match="image batch"):
        export_onnx(make("fp32")[0], tmp_path / "x.onnx", input_shape=(1, 3 * 32 * 32))


def test_export_leaves_the_model_as_it_was(tmp_path):
    model, shape, dataset, _ = make("ring4")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "m.onnx", shape, dataset)
    assert {layer.quantizer.mode for _, layer in quantized_layers(model)} == {"soft"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(RingqError, match="pass dataset="):
        export_onnx(make("uniform4_mlp")[0], tmp_path / "g.onnx", GREY)


def test_layers_with_equal_weights_share_one_packed_tensor(tmp_path):
    """The exporter stores equal tensors once; both layers then read one packed weight."""
    model, shape, dataset, _ = make("ring4")
    with torch.no_grad():
        model.layer1[1].conv1.positions.copy_(model.layer1[0].conv2.positions)
    report = export_onnx(model, tmp_path / "shared.onnx", shape, dataset)
    rows = {row["name"]: row for row in report["layers"]}
    assert rows["layer1.1.conv1"]["shared_with"] == "layer1.0.conv2"
    assert rows["layer1.1.conv1"]["packed_bytes"] == 0
    x = torch.randn(4, *shape[1:], generator=torch.Generator().manual_seed(5)).numpy()
    ref = reference_logits(model, x)
    got = run_onnx(tmp_path / "shared.onnx", x, threads=1)
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_pretrained_ring4_file_exports(tmp_path):
    source = ROOT / "pretrained" / "resnet20_ring4_kbit_cifar10.rqp"
    if not source.exists():
        pytest.skip(f"{source} not found")
    from ringq.checkpoint import load_model_from_checkpoint
    report = export_checkpoint_onnx(source, tmp_path / "r4.onnx")
    assert report["dataset"] == "cifar10" and set(report["bits_per_layer"].values()) == {2}
    assert report["file_bytes"] < 105_000 and report["ratio"] > 10
    model = load_model_from_checkpoint(source)[0].eval()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(4)).numpy()
    ref = reference_logits(model, x)
    got = run_onnx(tmp_path / "r4.onnx", x, threads=1)
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


@pytest.fixture(scope="module")
def ring_run(idx_data, tmp_path_factory):
    """A one-epoch ring-4 k-bit LeNet on the tiny Fashion-MNIST copy."""
    out = tmp_path_factory.mktemp("onnx_cli") / "ring4"
    assert train_main("mnist", tiny_args(idx_data, out, "--ring-size", 4, "--ring-layout",
                                         "distinct", "--epochs", 1, "--schedule")) == 0
    return out / "last.pt", idx_data


def test_export_and_evaluate_cli(ring_run, tmp_path):
    checkpoint, data = ring_run
    onnx_path, report_path = tmp_path / "lenet.onnx", tmp_path / "report.json"
    done = run_script("export.py", "--checkpoint", checkpoint, "--onnx", "--output", onnx_path)
    assert done.returncode == 0, done.stderr
    assert "ONNX opset 25" in done.stdout and "3 layers at 2 bits" in done.stdout
    assert "note:" in done.stdout  # a training checkpoint is in soft mode: its hard net goes
    done = run_script("evaluate.py", "--checkpoint", onnx_path, "--data-dir", data,
                      "--no-download", "--reference", checkpoint, "--json", report_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(report_path.read_text())
    final = json.loads((checkpoint.parent / "final.json").read_text())
    assert report["runtime"] == "onnxruntime" and report["dataset"] == "fashion-mnist"
    assert report["accuracy"]["hard"] == pytest.approx(final["accuracy"]["hard"], abs=1e-6)
    assert report["reference"]["same_top1"] == report["reference"]["total"] == 60
    assert report["reference"]["max_abs_logit_diff"] < 1e-3


@pytest.mark.parametrize("args,message", [
    (("--onnx", "--half"), "--onnx stores FP32 tensors as float32"),
    (("--onnx", "--model-only"), "--onnx and --model-only write different files")])
def test_export_onnx_refusals_are_one_line(ring_run, tmp_path, args, message):
    done = run_script("export.py", "--checkpoint", ring_run[0], "--output", tmp_path / "x",
                      *args)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr
    assert not (tmp_path / "x").exists()


def test_evaluate_refuses_a_foreign_onnx_file_in_one_line(tmp_path, ring_run):
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph, producer_name="someone"), str(path))
    done = run_script("evaluate.py", "--checkpoint", path, "--data-dir", ring_run[1])
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "not an ONNX file written by ringq" in done.stderr

