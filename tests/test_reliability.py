"""Real training processes killed, interrupted or poisoned: the run stays resumable.

After a SIGKILL (in the middle of a checkpoint write, or at random moments) or a
SIGINT/SIGTERM, ``--resume <dir>/last.pt`` must end exactly as an uninterrupted
run: equal weights (torch.equal), metrics.csv rows (all but the wall-clock time_s
column) and final.json. The uninterrupted references run in-process on one thread,
like the subprocesses (OMP_NUM_THREADS=1).
"""
import random
import signal
import time

import pytest

from ringq.checkpoint import safe_load
from run_helpers import (metric_rows, run_differences, run_script, start_script, tiny_args,
                         train_main)

pytest_plugins = ["run_helpers"]
pytestmark = pytest.mark.usefixtures("one_thread")
EPOCHS = ("--epochs", 4, "--schedule", 2)

# python -c KILL_DURING_SAVE NAME EPOCH ARGS...: train_mnist.py ARGS, SIGKILLed halfway
# through writing checkpoint NAME (last.pt / best.pt) of epoch EPOCH.
KILL_DURING_SAVE = r"""
import io, os, signal, sys
import torch
from ringq.train import main
target, epoch = sys.argv[1], int(sys.argv[2])
real_save = torch.save
def save(obj, f):
    name = os.path.basename(os.readlink(f"/proc/self/fd/{f.fileno()}"))
    if name.startswith(f".{target}.") and obj["epoch"] == epoch:
        data = io.BytesIO()
        real_save(obj, data)
        f.write(data.getvalue()[:data.tell() // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, f)
torch.save = save
main("mnist", sys.argv[3:])
"""


@pytest.fixture(scope="module")
def reference(idx_data, one_thread, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train_main("mnist", tiny_args(idx_data, out, *EPOCHS)) == 0
    return out


def resume_or_restart(data, out):
    """Flags that continue the run in ``out``, or start it over when nothing is saved yet."""
    last = out / "last.pt"
    return ["--resume", last] if last.exists() else tiny_args(data, out, *EPOCHS, "--overwrite")


@pytest.mark.parametrize("target, epoch", [("last.pt", 2), ("best.pt", 1)])
def test_sigkill_while_writing_a_checkpoint(reference, idx_data, tmp_path, target, epoch):
    out = tmp_path / "run"
    proc = start_script("-c " + KILL_DURING_SAVE, target, epoch, *tiny_args(idx_data, out, *EPOCHS))
    proc.communicate(timeout=180)
    assert proc.returncode == -signal.SIGKILL
    assert list(out.glob(f".{target}.*.tmp")), "the kill should land inside the write"
    assert safe_load(out / "last.pt")["epoch"] == epoch - 1
    assert train_main("mnist", ["--resume", out / "last.pt"]) == 0
    assert not list(out.glob(".*.tmp"))
    assert run_differences(reference, out) == []


def test_sigkill_at_random_moments(reference, idx_data, tmp_path):
    """Each try is killed at a random moment of its training phase (epochs of ~0.3 s,
    each ending with three file writes), then the next one resumes."""
    out, rng = tmp_path / "run", random.Random(0)
    for _ in range(3):
        proc = start_script("train_mnist.py", *resume_or_restart(idx_data, out))
        proc.stdout.readline()  # "run ...": data and model are ready, training starts
        time.sleep(rng.uniform(0.0, 1.0))
        proc.kill()
        proc.communicate(timeout=60)
        if (out / "last.pt").exists():  # then always loadable, whatever the kill hit
            assert 0 <= safe_load(out / "last.pt")["epoch"] <= 4
    assert train_main("mnist", resume_or_restart(idx_data, out)) == 0
    assert run_differences(reference, out) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_cleanly_and_the_run_resumes_exactly(idx_data, tmp_path, sig):
    out = tmp_path / "run"
    proc = start_script("train_mnist.py", *tiny_args(idx_data, out, "--epochs", 50, "--schedule"))
    for line in proc.stdout:
        if line.startswith("epoch 1/"):
            proc.send_signal(sig)
            break
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.count("\n") == 1 and f"{sig.name} received" in err
    assert err.strip().endswith(f"python train_mnist.py --resume {out / 'last.pt'}")
    saved = safe_load(out / "last.pt")["epoch"]
    assert saved >= 1 and len(metric_rows(out)) == saved
    assert not (out / "final.json").exists()
    # Without a schedule the epoch count does not change the trajectory: stop at saved + 1.
    epochs = ("--epochs", saved + 1)
    assert train_main("mnist", ["--resume", out / "last.pt", *epochs]) == 0
    reference = tmp_path / "reference"
    assert train_main("mnist", tiny_args(idx_data, reference, *epochs, "--schedule")) == 0
    assert run_differences(reference, out) == []


def test_non_finite_loss_stops_with_status_3(idx_data, tmp_path):
    out = tmp_path / "run"
    result = run_script("train_mnist.py", *tiny_args(idx_data, out, "--quantization", "none",
                                                     "--lr", "1e30"))
    assert result.returncode == 3, result.stderr
    err = result.stderr
    assert err.count("\n") == 1 and "non-finite loss or gradient at epoch 1, step" in err
    assert f"--resume {out / 'last.pt'}" in err and "Traceback" not in err
    assert safe_load(out / "last.pt")["epoch"] == 0
    assert not (out / "best.pt").exists() and not (out / "final.json").exists()
