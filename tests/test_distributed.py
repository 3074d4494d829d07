"""Data-parallel training on CPU (gloo): a 2-process run must equal a 1-process run.

Covers GlobalBatchNorm (against nn.BatchNorm, and across two real processes),
convert_batchnorm, and a tiny torchrun training of LeNet ring-4 on generated
Fashion-MNIST-shaped IDX files: same losses as one process, files written by
rank 0 only, a plain checkpoint that evaluate.py reads, and a 1-process resume.
"""
import csv
import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from models import build_model
from ringq.data import IDX_FILES
from ringq.distributed import GlobalBatchNorm, convert_batchnorm, global_moments

ROOT = Path(__file__).resolve().parents[1]
RUN_FILES = {"config.yaml", "last.pt", "best.pt", "metrics.csv", "final.json"}
# 500 training images in batches of 96: each epoch ends with a partial global batch (20 images),
# which both runs must train on identically.
TRAIN_ARGS = ["--dataset", "fashion-mnist", "--model", "lenet", "--ring-size", "4",
              "--epochs", "2", "--schedule", "1", "--batch-size", "96", "--lr", "0.02",
              "--loader", "memory", "--device", "cpu", "--precision", "fp32", "--quiet",
              "--no-download"]


# ---- GlobalBatchNorm without processes: exactly BatchNorm ---------------------------------------

def _bn_pass(bn, x):
    """Output, input gradient, parameter gradients and running stats after one training pass."""
    x = x.clone().requires_grad_(True)
    out = bn.train()(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return [out, x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var]


@pytest.mark.parametrize("shape,momentum", [((16, 3, 5, 5), 0.1), ((16, 3), None)])
def test_global_batchnorm_matches_batchnorm(shape, momentum):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.5 + 30.0
    plain = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(3, momentum=momentum)
    ours = GlobalBatchNorm(3, momentum=momentum)
    for _ in range(2):
        for a, b in zip(_bn_pass(ours, x), _bn_pass(plain, x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.eval()(x), plain.eval()(x))


def test_convert_batchnorm_keeps_parameters_and_keys():
    model = build_model(dict(model="lenet", quantization="ring", ring_size=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    convert_batchnorm(model)
    assert sum(isinstance(m, GlobalBatchNorm) for m in model.modules()) == 3
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert model.state_dict().keys() == before.keys()
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    optimizer.step()
    assert not torch.equal(model.features[1].bias, before["features.1.bias"])


# ---- global_moments across two gloo processes ---------------------------------------------------

def _shares():
    """One batch [7, 2, 3, 3] (channel means far from 0) and its rank shares: 7 rows and none."""
    x = torch.randn(7, 2, 3, 3, generator=torch.Generator().manual_seed(1)) + 100.0
    return x, [x, x[:0]]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moments_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        share = _shares()[1][rank].clone().requires_grad_(True)
        mean, var, count = global_moments(share, [0, 2, 3])
        (mean.sum() + var.sum()).backward()
        torch.save({"mean": mean.detach(), "var": var.detach(), "count": count,
                    "grad": share.grad}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_global_moments_across_processes_with_an_empty_share(tmp_path):
    mp.spawn(_moments_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    x, _ = _shares()
    x.requires_grad_(True)
    var, mean = torch.var_mean(x, [0, 2, 3], correction=0)
    (mean.sum() + var.sum()).backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["mean"], mean.detach())
        torch.testing.assert_close(got["var"], var.detach(), rtol=1e-4, atol=1e-6)
        assert got["count"].item() == x.numel() // 2
    # both ranks' losses read the shared statistics, so rank 0's input gradient sums the two
    torch.testing.assert_close(torch.load(tmp_path / "rank0.pt")["grad"], 2 * x.grad,
                               rtol=1e-3, atol=1e-5)
    assert torch.load(tmp_path / "rank1.pt")["grad"].numel() == 0


# ---- torchrun training ------------------------------------------------------------------------

def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(folder, n_train=500, n_test=64):
    """The four gzip IDX files: each class a fixed 28x28 pattern plus noise (learnable)."""
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 256, (10, 28, 28))
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 10
        images = np.clip(0.6 * patterns[labels] + rng.integers(0, 100, (n, 28, 28)), 0, 255)
        _write_idx(folder / f"{IDX_FILES[split][0]}.gz", images)
        _write_idx(folder / f"{IDX_FILES[split][1]}.gz", labels)
    return folder


def _run(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def _metrics(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run dirs: ddp (2 processes, 2 epochs), single (1 process, 3 epochs), resumed (ddp + 1)."""
    tmp = tmp_path_factory.mktemp("ddp")
    data_dir = write_fashion_mnist(tmp / "data")
    common = TRAIN_ARGS + ["--data-dir", str(data_dir)]
    out = {"ddp": tmp / "ddp", "single": tmp / "single", "resumed": tmp / "resumed"}
    out["ddp_log"] = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train_mnist.py", *common, "--output-dir", str(out["ddp"])])
    _run(["train_mnist.py", *common, "--epochs", "3", "--output-dir", str(out["single"])])
    shutil.copytree(out["ddp"], out["resumed"])
    _run(["train_mnist.py", "--resume", str(out["resumed"] / "last.pt"), "--epochs", "3"])
    out["data"] = data_dir
    return out


def _assert_rows_close(rows, ref_rows):
    for row, ref in zip(rows, ref_rows, strict=True):
        assert row["epoch"] == ref["epoch"]
        for key in ("train_loss", "train_acc", "eval_loss"):
            assert float(row[key]) == pytest.approx(float(ref[key]), rel=1e-4, abs=1e-6), \
                (row["epoch"], key)


def test_two_processes_match_one(runs):
    _assert_rows_close(_metrics(runs["ddp"]), _metrics(runs["single"])[:2])


def test_only_rank0_writes(runs):
    assert {p.name for p in runs["ddp"].iterdir()} == RUN_FILES
    assert [r["epoch"] for r in _metrics(runs["ddp"])] == ["1", "2"]
    assert runs["ddp_log"].count("epoch 2/2") == 1
    assert runs["ddp_log"].count("final test accuracy") == 1


def test_checkpoint_is_plain_and_evaluates(runs, tmp_path):
    ckpt = torch.load(runs["ddp"] / "last.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    build_model(ckpt["model_config"]).load_state_dict(ckpt["model"], strict=True)
    report = tmp_path / "eval.json"
    _run(["evaluate.py", "--checkpoint", str(runs["ddp"] / "last.pt"), "--data-dir",
          str(runs["data"]), "--device", "cpu", "--no-download", "--quiet", "--json", str(report)])
    got = json.loads(report.read_text())
    final = json.loads((runs["ddp"] / "final.json").read_text())
    assert got["num_examples"] == 64
    assert got["accuracy"] == final["accuracy"]


def test_resume_with_one_process(runs):
    rows = _metrics(runs["resumed"])
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert rows[:2] == _metrics(runs["ddp"])
    _assert_rows_close(rows, _metrics(runs["single"]))
    resumed = torch.load(runs["resumed"] / "last.pt", weights_only=True)["model"]
    single = torch.load(runs["single"] / "last.pt", weights_only=True)["model"]
    for key, value in single.items():
        if value.is_floating_point():
            torch.testing.assert_close(resumed[key], value, rtol=1e-3, atol=1e-4, msg=key)


# ---- local rank 0 loads (downloads) first ---------------------------------------------------

def _load_worker(rank, port, folder, fail):
    import time

    from ringq.distributed import DistInfo, local_rank_first
    from ringq.errors import DataError
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    marker = Path(folder) / "downloaded"

    def load():
        if rank == 0:
            time.sleep(0.5)  # a slow download: rank 1 must not look before it ends
            if fail:
                raise DataError("download failed")
            marker.write_text("data")
        return marker.exists()
    try:
        result = local_rank_first(DistInfo(rank, 2, rank), torch.device("cpu"), load)
    except DataError as e:
        result = str(e)
    finally:
        dist.destroy_process_group()
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.parametrize("fail", [False, True])
def test_local_rank_zero_loads_first(tmp_path, fail):
    mp.spawn(_load_worker, args=(_free_port(), str(tmp_path), fail), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    if fail:
        assert results[0] == "download failed" and "local rank 0" in results[1]
    else:
        assert results == [True, True]
