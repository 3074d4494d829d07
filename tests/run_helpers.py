"""Helpers of the training, CLI, checkpoint and reliability tests.

Data are made on the fly, so these tests never need ../shared: Fashion-MNIST-shaped
IDX files (28x28 grey, 10 classes, a bright band at a class-specific height) and a
CIFAR-shaped ImageFolder (32x32 RGB PNGs). Runs go in-process where only the
outcome matters (``exit_code``) and through real subprocesses (``run_script``,
``start_script``) where exit codes, stderr or signals are the point.

Test modules load this file as a plugin (``pytest_plugins``) for its fixtures and
import its functions; it holds no assertions, so it opts out of assertion
rewriting: PYTEST_DONT_REWRITE.
"""
import csv
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models import build_model
from ringq.checkpoint import FORMAT, safe_load
from ringq.data import IDX_FILES, ArrayDataset

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def write_idx(path, array):
    """An uncompressed IDX file of unsigned bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    Path(path).write_bytes(header + array.astype(np.uint8).tobytes())


def make_idx_dataset(folder, n_train=120, n_test=60, seed=0):
    """The four Fashion-MNIST IDX files in ``folder`` (made if needed); returns ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, (n, 28, 28))
        for i, label in enumerate(labels):
            images[i, 2 * label:2 * label + 6] += 150
        images_name, labels_name = IDX_FILES[split]
        write_idx(folder / images_name, images)
        write_idx(folder / labels_name, labels)
    return folder


def make_image_folder(folder, classes=("cat", "dog"), per_class=4, seed=0):
    """A CIFAR-shaped ImageFolder: ``folder``/{train,test}/<class>/N.png; returns ``folder``."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for name in classes:
            (Path(folder) / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(Path(folder) / split / name / f"{i}.png")
    return Path(folder)


def random_images(n, shape=(3, 32, 32), seed=0):
    """An ArrayDataset of ``n`` random uint8 images of ``shape``, labels 0..9 in turn."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)
    return ArrayDataset(images, torch.arange(n) % 10, [str(c) for c in range(10)])


def tiny_args(data, out, *extra):
    """Flags of a tiny ring-8 LeNet run on ``data`` into ``out`` (2 epochs, lr drop at 1).

    The device is pinned to the CPU, so runs compared bit for bit stay comparable on a
    machine with a GPU.
    """
    return ["--dataset", "fashion-mnist", "--data-dir", str(data), "--no-download",
            "--device", "cpu",
            "--epochs", "2", "--schedule", "1", "--batch-size", "50", "--quiet",
            "--output-dir", str(out), *map(str, extra)]


def exit_code(call, *args):
    """Run ``call(*args)`` in-process; its exit status (0 when it returns)."""
    try:
        result = call(*args)
    except SystemExit as e:
        return 0 if e.code is None else e.code
    return result if isinstance(result, int) else 0


def train_main(task, argv):
    """Exit status of ``train_<task>.py argv``, run in-process."""
    from ringq.train import main
    return exit_code(main, task, [str(a) for a in argv])


def run_script(script, *args, timeout=180):
    """Run ``python script args`` from the repository root; the CompletedProcess (text)."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=timeout)


def start_script(script, *args):
    """Start ``python script args`` (or ``python -c CODE args`` for script="-c CODE")."""
    command = script.split(" ", 1) if script.startswith("-c ") else [str(ROOT / script)]
    return subprocess.Popen([sys.executable, *command, *map(str, args)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def snapshot(folder):
    """{relative path: (size, mtime, inode)} of everything under ``folder``: any write or
    replacement changes it."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): (st.st_size, st.st_mtime_ns, st.st_ino)
            for p in sorted(folder.rglob("*")) for st in [p.stat()]}


def metric_rows(run_dir):
    """metrics.csv rows without the wall-clock ``time_s`` column."""
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "time_s"} for row in csv.DictReader(f)]


def weights(path):
    """The model state dict saved in a training checkpoint."""
    return safe_load(path)["model"]


def run_differences(a, b):
    """What differs between the ends of runs ``a`` and ``b``: weights (torch.equal),
    metrics.csv rows (but time_s), final.json (but its own path). [] when identical."""
    wa, wb = weights(Path(a) / "last.pt"), weights(Path(b) / "last.pt")
    found = [f"weights {name}" for name in sorted(set(wa) | set(wb))
             if name not in wa or name not in wb or not torch.equal(wa[name], wb[name])]
    found += [f"metrics.csv row {i + 1}" for i, (ra, rb) in
              enumerate(zip(metric_rows(a), metric_rows(b))) if ra != rb]
    if len(metric_rows(a)) != len(metric_rows(b)):
        found.append("metrics.csv length")
    fa, fb = (json.loads((Path(d) / "final.json").read_text()) for d in (a, b))
    found += [f"final.json {key}" for key in sorted(set(fa) | set(fb))
              if key != "checkpoint" and fa.get(key) != fb.get(key)]
    return found


def save_checkpoint(path, model_config, run_config=None, **fields):
    """A training-checkpoint-shaped file holding a freshly built model (no training)."""
    model = build_model(model_config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = {"format": FORMAT, "version": 2, "config": run_config or {},
            "model_config": model_config, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "epoch": 0, "history": [],
            "best": {"epoch": 0, "accuracy": -1.0}, "rng": {"torch": torch.get_rng_state()}}
    torch.save({**ckpt, **fields}, path)
    return Path(path)


class Payload:
    """Unpickling this object creates ``marker``: a stand-in for code run by a checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def idx_data(tmp_path_factory):
    """A tiny Fashion-MNIST folder (120 training, 60 test images)."""
    return make_idx_dataset(tmp_path_factory.mktemp("fashion-mnist"))


@pytest.fixture(scope="module")
def one_thread():
    """In-process runs on one thread, as the subprocesses (OMP_NUM_THREADS=1), for bit-equality."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
