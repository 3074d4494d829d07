#!/usr/bin/env python3
"""One prepared GPU check: the CUDA tests, fast-setting epochs, and CPU/GPU agreement.

    python bench/gpu_check.py [--archive cifar10-jpeg.tar.xz | --data-dir DIR] [--out DIR]
    python bench/gpu_check.py --dry-run      # the same steps on the CPU, on a tiny subset

Meant for a machine with one CUDA GPU, in under 8 minutes:

1. ``pytest tests/test_cuda.py`` (the tests that run on CUDA; they skip without it);
2. ResNet-20 FP32 and k-bit ring-4 (``experiments/cifar10/resnet20_{fp32,ring4_kbit}.yaml``)
   trained for 2 epochs on the full CIFAR-10 training split less a 5,000-image
   validation split, in the fast setting (``--precision auto --channels-last``), without
   and with ``--compile``; the second epoch's time (training plus validation pass,
   compilation excluded) gives the projected 200-epoch time;
3. ``evaluate.py`` on each final checkpoint on the GPU (``accuracy.device``) and on the
   CPU (``accuracy.cpu``): soft and hard (or fp32) test accuracies must agree within
   ``--tolerance`` points.

The data comes from the CIFAR-10 JPEG archive (extracted into ``--out``) or an existing
ImageFolder / python-batches directory. Everything lands in ``--out``: run folders, logs
and ``gpu_check.json`` (the figures); the exit status is 0 when every step passed.
``--dry-run`` runs every step on the CPU, training on a 512-image subset (128 for
validation), as a check of the script itself. The inputs (the archive or ``--data-dir``,
and ``--out``) are checked before any step runs: a missing one is one ``error:`` line,
exit status 2.
"""
import csv
import json
import platform
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ringq.errors import RingqError  # noqa: E402
from ringq.runtime import ArgumentParser, run_cli, run_logged  # noqa: E402

DEFAULT_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"
CONFIGS = {"fp32": "experiments/cifar10/resnet20_fp32.yaml",
           "ring4_kbit": "experiments/cifar10/resnet20_ring4_kbit.yaml"}
EPOCHS = 2


def get_args_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE,
                        help="CIFAR-10 JPEG archive (default: %(default)s)")
    source.add_argument("--data-dir", type=Path, help="an extracted CIFAR-10 directory")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"),
                        help="where data, runs and gpu_check.json go (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every step on the CPU on a tiny subset")
    parser.add_argument("--tolerance", type=float, default=0.1,
                        help="largest GPU/CPU accuracy difference, points (default: %(default)s)")
    return parser


def check_inputs(args):
    """RingqError (one line) unless the data source exists and ``--out`` can be a directory;
    checked before any step runs."""
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise RingqError(f"--data-dir {args.data_dir} is not a directory")
    if args.data_dir is None and not args.archive.is_file():
        raise RingqError(f"--archive {args.archive}: no such file (pass the CIFAR-10 JPEG "
                         f"archive, or --data-dir DIR for an extracted copy)")
    blocker = next((p for p in (args.out, *args.out.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise RingqError(f"--out {args.out}: {blocker} is not a directory")


def _unsafe(member, target):
    """Why extracting ``member`` into ``target`` (resolved) is refused; None when it is safe."""
    if member.name.startswith(("/", "\\")) or ".." in Path(member.name).parts:
        return "an absolute path or '..'"
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        return "a device, FIFO or other special file"
    destination = (target / member.name).resolve()
    if not destination.is_relative_to(target):
        return "a path outside the target directory"
    if member.issym() or member.islnk():
        link = Path(member.linkname)
        base = destination.parent if member.issym() else target
        if link.is_absolute() or not (base / link).resolve().is_relative_to(target):
            return f"a link to {member.linkname}, outside the target directory"
    return None


def extract(archive, target):
    """Extract the tar ``archive`` into ``target``, refusing members that would land outside it.

    Uses tarfile's ``data`` filter where this Python has it (3.10.12+, 3.11.4+),
    else checks each member itself: no absolute path, no ``..``, no link out of
    ``target``, no special file. RingqError for an unsafe member or a corrupt archive.
    """
    target = Path(target).resolve()
    try:
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(target, filter="data")
                return
            members = tar.getmembers()
            for member in members:
                problem = _unsafe(member, target)
                if problem:
                    raise RingqError(f"{archive}: member {member.name!r} is {problem}; "
                                     f"nothing was extracted")
            tar.extractall(target, members=members)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise RingqError(f"{archive}: cannot extract ({type(e).__name__}: {e})") from None


def prepare_data(args):
    """The CIFAR-10 directory to train on: ``--data-dir``, or the archive extracted once."""
    if args.data_dir:
        return args.data_dir
    target = args.out / "cifar10"
    if not (target / "train").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        extract(args.archive, target)
    return target


def train_command(name, data_dir, out, device, compile_, dry_run):
    """train_cifar10.py for 2 epochs of config ``name`` in the fast setting."""
    cmd = [sys.executable, "train_cifar10.py", "--config", CONFIGS[name], "--data-dir", data_dir,
           "--no-download", "--epochs", EPOCHS, "--schedule", "--ste-epochs", 0,
           "--val-split", 128 if dry_run else 5000, "--precision", "auto", "--channels-last",
           "--device", device, "--seed", 1, "--output-dir", out, "--overwrite", "--quiet"]
    if dry_run:
        cmd += ["--subset", 512]
    if compile_:
        cmd.append("--compile")
    return cmd


def evaluate_command(checkpoint, data_dir, device, report):
    return [sys.executable, "evaluate.py", "--checkpoint", checkpoint, "--data-dir", data_dir,
            "--no-download", "--device", device, "--json", report, "--quiet"]


def epoch_seconds(run_dir):
    """time_s of every epoch in ``run_dir``/metrics.csv."""
    with open(run_dir / "metrics.csv") as f:
        return [float(row["time_s"]) for row in csv.DictReader(f)]


def check_run(name, compile_, data_dir, device, args, log):
    """Train, then evaluate on ``device`` and on the CPU; the run's entry of the report."""
    tag = f"{name}{'_compiled' if compile_ else ''}"
    run_dir = args.out / "runs" / tag
    code, wall = run_logged(train_command(name, data_dir, run_dir, device, compile_,
                                         args.dry_run), log, ROOT)
    entry = {"train_status": code, "train_wall_s": round(wall, 1)}
    if code:
        return entry
    seconds = epoch_seconds(run_dir)
    entry.update(epoch_s=seconds, projected_200_epoch_min=round(200 * seconds[-1] / 60, 2))
    accuracy = {}
    for where, target in (("device", device), ("cpu", "cpu")):
        report = args.out / f"{tag}_eval_{where}.json"
        code, _ = run_logged(evaluate_command(run_dir / "last.pt", data_dir, target, report),
                             log, ROOT)
        entry[f"eval_status_{where}"] = code
        if code == 0:
            accuracy[where] = json.loads(report.read_text())["accuracy"]
    entry["accuracy"] = accuracy
    if len(accuracy) == 2:
        gap = max(abs(accuracy["device"][m] - accuracy["cpu"][m]) for m in accuracy["cpu"])
        entry["max_gpu_cpu_gap"] = round(gap, 4)
    return entry


def passed(entry, tolerance):
    return entry.get("max_gpu_cpu_gap", float("inf")) <= tolerance


def environment(device):
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            raise RingqError("no CUDA GPU here; run with --dry-run to check the script on the CPU")
    check_inputs(args)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "gpu_check.log"
    started = time.perf_counter()
    report = {"dry_run": args.dry_run, "environment": environment(device)}
    code, wall = run_logged([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests/test_cuda.py"], log, ROOT)
    report["cuda_tests"] = {"status": code, "wall_s": round(wall, 1)}
    data_dir = prepare_data(args)
    report["runs"] = {}
    for name in CONFIGS:
        for compile_ in (False, True):
            tag = f"{name}{'_compiled' if compile_ else ''}"
            report["runs"][tag] = check_run(name, compile_, data_dir, device, args, log)
            print(f"{tag}: {json.dumps(report['runs'][tag])}", flush=True)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report["passed"] = code == 0 and all(passed(e, args.tolerance)
                                         for e in report["runs"].values())
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'passed' if report['passed'] else 'FAILED'} in {report['wall_s']} s; "
          f"report {args.out / 'gpu_check.json'}, log {log}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
