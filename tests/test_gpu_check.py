"""bench/gpu_check.py: its commands, its refusal without a GPU, and (slow) its CPU dry run."""
import io
import json
import subprocess
import sys
import tarfile

import pytest
import torch

from conftest import ROOT
from ringq.errors import RingqError
from ringq.runtime import run_cli, run_logged

sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402


@pytest.mark.parametrize("compile_", [False, True])
def test_training_command_is_the_fast_setting(tmp_path, compile_):
    cmd = [str(c) for c in gpu_check.train_command("ring4_kbit", tmp_path, tmp_path / "run",
                                                   "cuda", compile_, dry_run=False)]
    assert cmd[1:4] == ["train_cifar10.py", "--config",
                        "experiments/cifar10/resnet20_ring4_kbit.yaml"]
    for flag, value in (("--epochs", "2"), ("--precision", "auto"), ("--val-split", "5000"),
                        ("--device", "cuda"), ("--ste-epochs", "0")):
        assert cmd[cmd.index(flag) + 1] == value
    assert "--channels-last" in cmd and ("--compile" in cmd) == compile_
    assert "--subset" not in cmd


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_refuses_without_a_gpu(tmp_path):
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--dry-run" in result.stderr


@pytest.mark.slow
def test_dry_run_passes_on_the_cpu(cifar_dir, tmp_path):
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--data-dir",
                             cifar_dir, "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["passed"] and report["dry_run"]
    assert set(report["runs"]) == {"fp32", "fp32_compiled", "ring4_kbit", "ring4_kbit_compiled"}
    for entry in report["runs"].values():
        assert len(entry["epoch_s"]) == 2 and entry["max_gpu_cpu_gap"] == 0


# --- inputs, checked before any step ---------------------------------------------------

@pytest.fixture
def no_steps(monkeypatch):
    """No step (pytest, training, evaluation) may start: running one fails the test."""
    def refuse(cmd, *args, **kwargs):
        raise AssertionError(f"a step ran before the inputs were checked: {cmd}")
    monkeypatch.setattr(gpu_check, "run_logged", refuse)


@pytest.mark.parametrize("flags, fragment", [
    (["--archive", "{tmp}/missing.tar.xz"], "--archive {tmp}/missing.tar.xz: no such file"),
    (["--data-dir", "{tmp}/nowhere"], "--data-dir {tmp}/nowhere is not a directory"),
    (["--data-dir", "{tmp}", "--out", "{tmp}/afile/out"], "--out {tmp}/afile/out: {tmp}/afile "
                                                         "is not a directory"),
])
def test_bad_inputs_are_one_line_before_any_step(tmp_path, capsys, no_steps, flags, fragment):
    (tmp_path / "afile").write_text("x")
    flags = [f.format(tmp=tmp_path) for f in flags]
    out = ["--out", str(tmp_path / "out")] if "--out" not in flags else []
    with pytest.raises(SystemExit) as info:
        run_cli(gpu_check.main, ["--dry-run", *flags, *out])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: ") and fragment.format(tmp=tmp_path) in err
    assert not (tmp_path / "out").exists()


def test_missing_archive_as_a_process(tmp_path):
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--archive",
                             str(tmp_path / "gone.tar.xz"), "--out", str(tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "no such file" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_steps_run_through_the_shared_helper():
    assert gpu_check.run_logged is run_logged and not hasattr(gpu_check, "run")


# --- extraction on any Python 3.10 -------------------------------------------------------

def _tar(path, members):
    """A tar archive at ``path`` of (TarInfo fields, data bytes or None) entries."""
    with tarfile.open(path, "w") as tar:
        for fields, data in members:
            info = tarfile.TarInfo(fields.pop("name"))
            for key, value in fields.items():
                setattr(info, key, value)
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


@pytest.fixture(params=["data filter", "own checks"])
def filter_mode(request, monkeypatch):
    """Extraction with tarfile's data filter, and as on a Python 3.10 without it."""
    if request.param == "own checks":
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    return request.param


def test_extracts_a_good_archive(tmp_path, filter_mode):
    archive = _tar(tmp_path / "good.tar", [
        ({"name": "train", "type": tarfile.DIRTYPE}, None),
        ({"name": "train/cat/0.png"}, b"png"),
        ({"name": "test/cat/0.png"}, b"png2"),
        ({"name": "test/latest", "type": tarfile.SYMTYPE, "linkname": "cat/0.png"}, None),
    ])
    gpu_check.extract(archive, tmp_path / "out")
    assert (tmp_path / "out" / "train" / "cat" / "0.png").read_bytes() == b"png"
    assert (tmp_path / "out" / "test" / "latest").read_bytes() == b"png2"


EVIL = {
    "dot-dot": ({"name": "../outside/evil.txt"}, b"x"),
    "absolute-link": ({"name": "link", "type": tarfile.SYMTYPE,
                       "linkname": "{tmp}/outside/evil.txt"}, None),
    "link-out": ({"name": "a/link", "type": tarfile.SYMTYPE, "linkname": "../../outside"}, None),
    "hard-link-out": ({"name": "hard", "type": tarfile.LNKTYPE,
                       "linkname": "../outside/evil.txt"}, None),
    "device": ({"name": "dev", "type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}, None),
}


@pytest.mark.parametrize("case", EVIL)
def test_refuses_members_that_leave_the_target(tmp_path, filter_mode, case):
    fields, data = EVIL[case]
    fields = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in fields.items()}
    (tmp_path / "outside").mkdir()
    archive = _tar(tmp_path / "evil.tar", [({"name": "ok.txt"}, b"ok"), (fields, data)])
    target = tmp_path / "out" / "cifar10"
    with pytest.raises(RingqError) as info:
        gpu_check.extract(archive, target)
    assert "\n" not in str(info.value) and str(archive) in str(info.value)
    assert list((tmp_path / "outside").iterdir()) == []
    if filter_mode == "own checks":
        assert not target.exists() or list(target.iterdir()) == []  # nothing at all extracted


def test_corrupt_archive_is_one_line(tmp_path):
    archive = tmp_path / "bad.tar.xz"
    archive.write_bytes(b"not an archive at all")
    with pytest.raises(RingqError, match="cannot extract"):
        gpu_check.extract(archive, tmp_path / "out")
