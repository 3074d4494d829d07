"""Bad input to the CLIs: exit status 2, one ``error: ...`` line on stderr, nothing written.

One table over train_mnist.py, train_cifar10.py, evaluate.py and export.py. Most cases
run in-process (the same ``run_cli`` exit path, fast); the ones in SUBPROCESS also run
as real processes, to prove that path end to end. Every case snapshots the whole
temporary tree (data, the finished run, the would-be output directory) before and after.

Tests run as root, whom chmod does not stop from writing: an unwritable output
directory is made as a path under a regular file instead.
"""
import pickle
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

import evaluate
import export
from packed_helpers import rewrite_header
from ringq.checkpoint import load_model_from_checkpoint
from ringq.data import load_split
from ringq.packing import export_packed
from ringq.runtime import run_cli
from run_helpers import (ENV, ROOT, Payload, exit_code, make_image_folder, run_script,
                         save_checkpoint, snapshot, tiny_args, train_main)

pytest_plugins = ["run_helpers"]

TRAIN = ("--dataset fashion-mnist --data-dir {data} --no-download --epochs 2 --schedule 1 "
         "--batch-size 50 --quiet --output-dir {root}/new")
CIFAR = ("--data-dir {cifar} --no-download --epochs 1 --schedule --batch-size 8 --quiet "
         "--output-dir {root}/new")
EVAL = "--quiet --no-download --checkpoint"
RESNET20 = {"model": "resnet20", "quantization": "ring", "ring_size": 4, "ring_type": "triangle",
            "ring_layout": "published", "interpolation": "gaussian", "sigma": None,
            "num_classes": 10, "in_channels": 3, "image_size": 32}
YAML = {"list.yaml": "- epochs\n- 3\n", "broken.yaml": "epochs: [1\n",
        "unknown.yaml": "learning_rate: 0.1\n", "type.yaml": "epochs: three\n",
        "range.yaml": "ring_size: 1\n"}

CASES = [  # (id, CLI, arguments, fragment of the error line)
    ("ring-size-0", "mnist", TRAIN + " --ring-size 0", "ring_size must be between 2 and 256"),
    ("ring-size-1", "mnist", TRAIN + " --ring-size 1", "ring_size must be between 2 and 256"),
    ("ring-size-negative", "mnist", TRAIN + " --ring-size -4", "ring_size must be between"),
    ("ring-size-huge", "mnist", TRAIN + " --ring-size 1000000", "ring_size must be between"),
    ("ring-size-word", "mnist", TRAIN + " --ring-size four",
     "argument --ring-size: invalid int value: 'four'"),
    ("sigma-zero", "mnist", TRAIN + " --sigma 0", "sigma must be > 0"),
    ("sigma-negative", "mnist", TRAIN + " --sigma -0.5", "sigma must be > 0"),
    ("sigma-nan", "mnist", TRAIN + " --sigma nan", "sigma: must be a finite number"),
    ("lr-negative", "mnist", TRAIN + " --lr -0.1", "lr must be > 0"),
    ("lr-word", "mnist", TRAIN + " --lr fast", "argument --lr: invalid float value"),
    ("position-lr-scale-zero", "mnist", TRAIN + " --position-lr-scale 0",
     "position_lr_scale must be > 0"),
    ("epochs-zero", "mnist", TRAIN + " --epochs 0 --schedule", "epochs must be > 0"),
    ("milestones-unsorted", "mnist", TRAIN + " --epochs 5 --schedule 3 2",
     "milestones must be positive and strictly increasing"),
    ("milestone-beyond-epochs", "mnist", TRAIN + " --schedule 5",
     "milestone 5 is beyond --epochs 2"),
    ("batch-size-zero", "mnist", TRAIN + " --batch-size 0", "batch_size must be > 0"),
    ("batch-size-negative", "mnist", TRAIN + " --batch-size -50", "batch_size must be > 0"),
    ("gamma-above-1", "mnist", TRAIN + " --gamma 2", "gamma must be in (0, 1]"),
    ("momentum-1", "mnist", TRAIN + " --momentum 1", "momentum must be in [0, 1)"),
    ("seed-negative", "mnist", TRAIN + " --seed -1", "seed must be in [0, 2**32)"),
    ("ste-beyond-epochs", "mnist", TRAIN + " --ste-epochs 3", "ste_epochs: 3 is more than"),
    ("hard-selection-fp32", "mnist", TRAIN + " --quantization none --select-mode hard",
     "select_mode: 'hard' needs a ring or uniform model"),
    ("val-split-too-large", "mnist", TRAIN + " --val-split 500",
     "val_split 500 is not smaller than the 120 training images"),
    ("subset-too-large", "mnist", TRAIN + " --subset 500",
     "subset 500 is larger than the 120 training images"),
    ("unknown-model", "mnist", TRAIN + " --model vgg16", "invalid choice: 'vgg16'"),
    ("model-of-other-script", "mnist", TRAIN + " --model resnet20",
     "invalid choice: 'resnet20'"),
    ("unknown-ring-type", "mnist", TRAIN + " --ring-type hexagon", "invalid choice: 'hexagon'"),
    ("unknown-flag", "mnist", TRAIN + " --learning-rate 0.1",
     "unrecognized arguments: --learning-rate"),
    ("unknown-device", "mnist", TRAIN + " --device tpu", "unknown device 'tpu'"),
    ("yaml-not-mapping", "mnist", TRAIN + " --config {root}/list.yaml",
     "must hold a mapping of options, got list"),
    ("yaml-invalid", "mnist", TRAIN + " --config {root}/broken.yaml", "is not valid YAML"),
    ("yaml-unknown-key", "mnist", TRAIN + " --config {root}/unknown.yaml",
     "unknown key 'learning_rate'"),
    ("yaml-wrong-type", "mnist", TRAIN + " --config {root}/type.yaml",
     "key 'epochs': expected int, got 'three'"),
    ("yaml-out-of-range", "mnist", TRAIN + " --config {root}/range.yaml",
     "ring_size must be between 2 and 256, got 1"),
    ("yaml-missing", "mnist", TRAIN + " --config {root}/none.yaml", "config file not found"),
    ("data-dir-missing", "mnist", TRAIN + " --data-dir {root}/nowhere",
     "no such data directory {root}/nowhere; expected the four IDX files train-images-idx3-ubyte"),
    ("data-dir-under-a-file", "mnist", TRAIN.replace(" --no-download", "")
     + " --data-dir {root}/afile/x", "data directory {root}/afile/x cannot exist: "
     "{root}/afile is a file"),
    ("data-dir-is-a-file", "mnist", TRAIN + " --data-dir {root}/afile", "is not a directory"),
    ("data-dir-empty", "mnist", TRAIN + " --data-dir {root}/empty",
     "train-images-idx3-ubyte, train-labels-idx1-ubyte (or .gz) not found"),
    ("data-file-corrupt", "mnist", TRAIN + " --data-dir {root}/corrupt", "corrupt or truncated"),
    ("output-dir-is-a-file", "mnist", TRAIN + " --output-dir {root}/afile",
     "exists and is not a directory"),
    ("output-dir-unwritable", "mnist", TRAIN + " --output-dir {root}/afile/run",
     "cannot create output directory"),
    ("output-dir-holds-a-run", "mnist", TRAIN + " --output-dir {run}",
     "pass --resume {run}/last.pt to continue it, or --overwrite"),
    ("resume-missing", "mnist", "--resume {root}/gone/last.pt", "no such file"),
    ("resume-other-architecture", "mnist", "--resume {root}/resnet.pt",
     "checkpoint of a resnet20 run; resume it with train_cifar10.py"),
    ("resume-changed-architecture", "mnist", "--resume {run}/last.pt --model mlp",
     "it cannot continue with model='mlp'"),
    ("resume-changed-seed", "mnist", "--resume {run}/last.pt --seed 7",
     "it cannot continue with seed=7"),
    ("resume-bare-state-dict", "mnist", "--resume {root}/state_dict.pt",
     "not a training checkpoint of this project"),
    ("resume-code", "mnist", "--resume {root}/code.pt", "refused: loading it would call"),
    ("resume-truncated", "mnist", "--resume {root}/truncated.pt", "truncated or corrupt"),
    ("resume-empty", "mnist", "--resume {root}/empty.pt", "empty file"),
    ("cifar-model-of-other-script", "cifar10", CIFAR + " --model lenet",
     "invalid choice: 'lenet'"),
    ("cifar-data-dir-missing", "cifar10", CIFAR + " --data-dir {root}/nowhere",
     "expected cifar-10-batches-py/"),
    ("cifar-no-class-folders", "cifar10", CIFAR + " --data-dir {root}/cifar-flat",
     "has no class folders"),
    ("cifar-subset-too-large", "cifar10", CIFAR + " --subset 100",
     "subset 100 is larger than the 8 training images"),
    ("cifar-resume-mnist-run", "cifar10", "--resume {run}/last.pt",
     "checkpoint of a lenet run; resume it with train_mnist.py"),
    ("bits-1", "mnist", TRAIN + " --quantization uniform --bits 1",
     "bits must be between 2 and 8, got 1"),
    ("bits-9", "mnist", TRAIN + " --quantization uniform --bits 9",
     "bits must be between 2 and 8, got 9"),
    ("bits-word", "mnist", TRAIN + " --quantization uniform --bits four",
     "argument --bits: invalid int value: 'four'"),
    ("uniform-without-bits", "mnist", TRAIN + " --quantization uniform",
     "bits: --quantization uniform needs --bits K"),
    ("bits-with-ring", "mnist", TRAIN + " --bits 4", "bits: only for --quantization uniform"),
    ("init-from-missing", "mnist", TRAIN + " --init-from {root}/gone.pt", "gone.pt: no such file"),
    ("init-from-code", "mnist", TRAIN + " --init-from {root}/code.pt",
     "refused: loading it would call"),
    ("init-from-ring-run", "mnist", TRAIN + " --quantization uniform --bits 4 --init-from "
     "{run}/last.pt", "not an FP32 checkpoint (quantization 'ring')"),
    ("init-from-other-network", "mnist", TRAIN + " --init-from {root}/mlp_fp32.pt",
     "mlp_fp32.pt: holds a mlp, this run trains a lenet"),
    ("init-from-into-fp32", "mnist", TRAIN + " --quantization none --init-from {root}/mlp_fp32.pt",
     "init_from: needs a quantized model"),
    ("resume-changed-bits", "mnist", "--resume {run}/last.pt --quantization uniform --bits 4",
     "it cannot continue with quantization='uniform', bits=4"),
    ("evaluate-ptq-bits-9", "evaluate", EVAL + " {run}/last.pt --ptq-bits 9",
     "argument --ptq-bits: must be between 2 and 8, got 9"),
    ("evaluate-ptq-of-ring", "evaluate", EVAL + " {run}/last.pt --ptq-bits 4",
     "post-training quantization needs an FP32 checkpoint"),
    ("export-bits-1", "export", "--output {root}/out.rqp --checkpoint {root}/mlp_fp32.pt --bits 1",
     "argument --bits: must be between 2 and 8, got 1"),
    ("export-bits-of-ring", "export", "--output {root}/out.rqp --checkpoint {run}/last.pt --bits 4",
     "holds a ring model"),
    ("export-fp32-without-bits", "export", "--output {root}/out.rqp --checkpoint "
     "{root}/mlp_fp32.pt", "has no quantized layers (pass --bits K"),
    ("evaluate-no-checkpoint-flag", "evaluate", "--quiet",
     "the following arguments are required: --checkpoint"),
    ("evaluate-missing", "evaluate", EVAL + " {root}/gone.pt", "no such file"),
    ("evaluate-empty", "evaluate", EVAL + " {root}/empty.pt", "empty file"),
    ("evaluate-random-bytes", "evaluate", EVAL + " {root}/random.pt",
     "not a readable checkpoint"),
    ("evaluate-truncated", "evaluate", EVAL + " {root}/truncated.pt", "truncated or corrupt"),
    ("evaluate-code", "evaluate", EVAL + " {root}/code.pt", "refused: loading it would call"),
    ("evaluate-code-raw-pickle", "evaluate", EVAL + " {root}/code.pkl",
     "refused: a raw pickle stream"),
    ("evaluate-wrong-architecture", "evaluate", EVAL + " {root}/tampered.pt",
     "weights do not fit the model"),
    ("evaluate-batch-size-0", "evaluate", EVAL + " {run}/last.pt --batch-size 0",
     "argument --batch-size: must be >= 1, got 0"),
    ("evaluate-unknown-dataset", "evaluate", EVAL + " {run}/last.pt --dataset svhn",
     "invalid choice: 'svhn'"),
    ("evaluate-data-of-other-shape", "evaluate",
     EVAL + " {run}/last.pt --dataset cifar10 --data-dir {cifar}",
     "for 1-channel 28x28 images, but the cifar10 test split has 3-channel 32x32 images"),
    ("evaluate-data-dir-missing", "evaluate", EVAL + " {run}/last.pt --data-dir {root}/nowhere",
     "no such data directory {root}/nowhere; expected the four IDX files"),
    ("evaluate-data-dir-under-a-file", "evaluate", "--quiet --checkpoint {run}/last.pt "
     "--data-dir {root}/afile/x", "{root}/afile is a file"),
    ("evaluate-bn-recalibrate-fp32", "evaluate", EVAL + " {root}/mlp_fp32.pt --bn-recalibrate 100 "
     "--data-dir {root}/nowhere", "--bn-recalibrate needs a quantized model"),
    ("evaluate-huge-packed-config", "evaluate", EVAL + " {root}/huge.rqp",
     "huge.rqp: config: num_classes: must be an integer in 1..100000, got 1099511627776"),
    ("evaluate-huge-model-config", "evaluate", EVAL + " {root}/huge.pt",
     "huge.pt: model config: in_channels: must be an integer in 1..64, got 1099511627776"),
    ("export-huge-packed-config", "export", "--output {root}/out.rqp --checkpoint {root}/huge.rqp",
     "huge.rqp: config: num_classes: must be an integer"),
    ("export-model-only-of-packed", "export", "--output {root}/out.pt --model-only --checkpoint "
     "{root}/lenet.rqp", "lenet.rqp: a packed file (export.py output), not a training "
     "checkpoint; --model-only takes the last.pt or best.pt written by train_*.py"),
    ("evaluate-json-unwritable", "evaluate", EVAL + " {run}/last.pt --json {root}/afile/r.json",
     "cannot write --json"),
    ("export-code", "export", "--output {root}/out.rqp --checkpoint {root}/code.pt",
     "refused: loading it would call"),
    ("export-truncated", "export", "--output {root}/out.rqp --checkpoint {root}/truncated.pt",
     "truncated or corrupt"),
    ("export-missing", "export", "--output {root}/out.rqp --checkpoint {root}/gone.pt",
     "no such file"),
]
SUBPROCESS = {"ring-size-word", "yaml-invalid", "data-dir-missing", "resume-code",
              "evaluate-code", "export-code", "init-from-ring-run", "export-bits-1",
              "evaluate-data-dir-under-a-file", "evaluate-huge-packed-config",
              "evaluate-huge-model-config", "export-model-only-of-packed"}
MLP_FP32 = {"model": "mlp", "quantization": "none", "num_classes": 10, "in_channels": 1,
            "image_size": 28}
SCRIPTS = {"mnist": "train_mnist.py", "cifar10": "train_cifar10.py",
           "evaluate": "evaluate.py", "export": "export.py"}


@pytest.fixture(scope="module")
def inputs(idx_data, tmp_path_factory):
    """Every file the cases name, under one root: {placeholder: path}."""
    root = tmp_path_factory.mktemp("cli")
    data = shutil.copytree(idx_data, root / "fashion")
    run = root / "run"
    assert train_main("mnist", tiny_args(data, run, "--epochs", 1, "--schedule")) == 0
    cifar = make_image_folder(root / "cifar")
    for split in ("train", "test"):
        load_split("cifar10", cifar, split)  # writes the decode cache now, not during a case
    (root / "cifar-flat" / "train").mkdir(parents=True)
    (root / "empty").mkdir()
    corrupt = shutil.copytree(data, root / "corrupt")
    path = corrupt / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    (root / "afile").write_text("a regular file\n")
    for name, text in YAML.items():
        (root / name).write_text(text)
    good = (run / "last.pt").read_bytes()
    (root / "truncated.pt").write_bytes(good[:len(good) // 2])
    (root / "empty.pt").write_bytes(b"")
    (root / "random.pt").write_bytes(bytes(range(7, 250)) * 40)
    torch.save({"model": Payload(root / "MARKER")}, root / "code.pt")
    (root / "code.pkl").write_bytes(pickle.dumps(Payload(root / "MARKER")))
    torch.save(torch.load(run / "last.pt", weights_only=True)["model"], root / "state_dict.pt")
    save_checkpoint(root / "resnet.pt", RESNET20, {"model": "resnet20", "dataset": "cifar10"})
    save_checkpoint(root / "mlp_fp32.pt", MLP_FP32, {"model": "mlp", "dataset": "fashion-mnist"})
    tampered = torch.load(run / "last.pt", weights_only=True)
    tampered["model_config"] = {**tampered["model_config"], "model": "mlp"}
    torch.save(tampered, root / "tampered.pt")
    tampered["model_config"] = {**tampered["model_config"], "model": "lenet", "in_channels": 2**40}
    torch.save(tampered, root / "huge.pt")
    model, config, _ = load_model_from_checkpoint(run / "last.pt")
    export_packed(model, config, root / "lenet.rqp")
    rewrite_header(root / "lenet.rqp", root / "huge.rqp",
                   lambda h: h["config"].update(num_classes=2**40))
    return {"root": root, "data": data, "run": run, "cifar": cifar}


def in_process(cli, argv):
    if cli in ("mnist", "cifar10"):
        return train_main(cli, argv)
    if cli == "evaluate":
        return exit_code(run_cli, evaluate.main, argv)
    return exit_code(run_cli, export.main, argv)


def check_outcome(code, out, err, fragment):
    assert code == 2, err
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment in err, err


@pytest.mark.parametrize("cli, args, fragment", [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_bad_input_in_process(inputs, capsys, cli, args, fragment):
    argv = shlex.split(args.format(**inputs))
    before = snapshot(inputs["root"])
    code = in_process(cli, argv)
    captured = capsys.readouterr()
    check_outcome(code, captured.out, captured.err, fragment.format(**inputs))
    assert snapshot(inputs["root"]) == before
    assert not (inputs["root"] / "MARKER").exists()


@pytest.mark.parametrize("cli, args, fragment", [case[1:] for case in CASES
                                                 if case[0] in SUBPROCESS],
                         ids=[case[0] for case in CASES if case[0] in SUBPROCESS])
def test_bad_input_as_a_process(inputs, cli, args, fragment):
    before = snapshot(inputs["root"])
    result = run_script(SCRIPTS[cli], *shlex.split(args.format(**inputs)))
    check_outcome(result.returncode, result.stdout, result.stderr, fragment.format(**inputs))
    assert "Traceback" not in result.stderr
    assert snapshot(inputs["root"]) == before
    assert not (inputs["root"] / "MARKER").exists()


def test_the_matrix_is_wide():
    assert len(CASES) >= 30 and {case[1] for case in CASES} == set(SCRIPTS)


def test_output_closed_early_ends_quietly(tmp_path):
    """``export.py ... | head -0``: the file is written, no traceback, status 1."""
    out = tmp_path / "copy.rqp"
    proc = subprocess.Popen([sys.executable, "export.py", "--checkpoint",
                             "pretrained/lenet_ring4_kbit_fashion_mnist.rqp", "--output", str(out)],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 1
    assert err == "" and out.stat().st_size > 0
