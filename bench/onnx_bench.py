#!/usr/bin/env python3
"""CPU deployment benchmark: onnxruntime on the k-bit ONNX file vs PyTorch eager on the same
hard network; optionally their test accuracies side by side.

    python bench/onnx_bench.py [--checkpoint FILE] [--onnx OUT] [--batches 1 256]
                               [--repeats R] [--repeats-large R] [--threads T] [--json OUT]
    python bench/onnx_bench.py --checkpoint A.rqp [--checkpoint B.rqp ...] --data-dir DIR
                               --out-dir DIR --no-latency      # accuracy comparison only

Latency: the first checkpoint is exported with ``ringq.onnx_export`` (to --onnx, else a
temp file); then, for each batch size and runtime, a fresh Python process loads the
network (onnxruntime: an InferenceSession on the file, CPU provider, importing neither
torch nor this repository; PyTorch: ``load_model_from_checkpoint`` in hard mode, eval,
``torch.no_grad``), runs ``warmup`` passes and times ``repeats`` passes on the same
random batch: median and 90th-percentile milliseconds per pass, images/s from the
median, the session start-up (onnxruntime) or model load (PyTorch) time, and peak
resident memory of that process (VmHWM, its own high-water mark since exec), with the
RSS after imports. ru_maxrss is given too but is not the worker's own figure: on Linux
it carries the parent's peak RSS across the fork and exec. Both runtimes get ``--threads`` intra-op
threads (default: every CPU). Repetitions are modest on purpose: on a shared CPU
(other jobs running) the figures are indicative; the output records the load average
before and after.

Accuracy (--data-dir): each checkpoint's ONNX file (in --out-dir) evaluated by
onnxruntime on the test split's uint8 images (normalised as recorded in the file) and
the same model in PyTorch hard mode: accuracies, top-1 disagreements, max |logit
difference|, file bytes.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = ROOT / "pretrained" / "resnet20_ring4_kbit_cifar10.rqp"
SHARED_NOTE = ("CPU shared with other jobs: latencies are indicative (modest repetitions, "
               "medians); compare runtimes within one run")


# --------------------------------------------------------------------------------------------
# Worker: one runtime, one batch size, in a fresh process
# --------------------------------------------------------------------------------------------

def _memory_kb():
    """(VmRSS, VmHWM) of this process in KiB, from /proc (None off Linux)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text()
                      .splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        return None, None


def _time_passes(run, warmup, repeats):
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return times


def worker(args):
    import resource

    import numpy as np
    shape = tuple(args.shape)
    x = np.random.default_rng(0).standard_normal((args.batch, *shape), dtype=np.float32)
    if args.worker == "onnxruntime":
        import onnxruntime as ort
        rss_import, _ = _memory_kb()
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        start = time.perf_counter()
        session = ort.InferenceSession(args.file, options, providers=["CPUExecutionProvider"])
        start_s = time.perf_counter() - start
        name = session.get_inputs()[0].name

        def run():
            session.run(None, {name: x})
        version = ort.__version__
    else:
        import torch
        sys.path.insert(0, str(ROOT))
        from models.utils import set_weight_mode
        from ringq.checkpoint import load_model_from_checkpoint
        torch.set_num_threads(args.threads)
        rss_import, _ = _memory_kb()
        start = time.perf_counter()
        model = load_model_from_checkpoint(args.file)[0].eval()
        set_weight_mode(model, "hard")
        start_s = time.perf_counter() - start
        xt = torch.from_numpy(x)

        def run():
            with torch.no_grad():
                model(xt)
        version = torch.__version__
    times = _time_passes(run, args.warmup, args.repeats)
    rss, hwm = _memory_kb()
    median = statistics.median(times)
    print(json.dumps({
        "runtime": args.worker, "version": version, "batch": args.batch,
        "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
        "median_ms": median, "p90_ms": sorted(times)[int(0.9 * (len(times) - 1))],
        "min_ms": min(times), "images_per_s": args.batch * 1000 / median,
        "startup_s": start_s, "rss_after_import_mib": rss_import and rss_import / 1024,
        "peak_rss_mib": hwm and hwm / 1024,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_worker(runtime, file, batch, shape, repeats, warmup, threads):
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", runtime, "--file",
               str(file), "--batch", str(batch), "--repeats", str(repeats), "--warmup",
               str(warmup), "--threads", str(threads), "--shape", *map(str, shape)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode:
        raise RuntimeError(f"{runtime} worker (batch {batch}) failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Latency and accuracy
# --------------------------------------------------------------------------------------------

def latency(args, checkpoint, onnx_path):
    from ringq.onnx_export import checkpoint_input, export_checkpoint_onnx
    from ringq.checkpoint import load_model_from_checkpoint
    report = export_checkpoint_onnx(checkpoint, onnx_path)
    _, config, meta = load_model_from_checkpoint(checkpoint)
    shape = checkpoint_input(config, meta)[0][1:]
    rows = []
    for batch in args.batches:
        repeats = args.repeats if batch == 1 else args.repeats_large
        warmup = 3 if batch == 1 else 1
        for runtime, file in (("onnxruntime", onnx_path), ("pytorch", checkpoint)):
            rows.append(run_worker(runtime, file, batch, shape, repeats, warmup, args.threads))
    return {"checkpoint": str(checkpoint), "onnx": str(onnx_path),
            "onnx_file_bytes": report["file_bytes"], "checkpoint_bytes":
            Path(checkpoint).stat().st_size, "fp32_onnx_bytes": report["fp32_onnx_bytes"],
            "results": rows}


def accuracy(args, checkpoint, out_dir):
    import numpy as np
    import torch
    from models.utils import set_weight_mode
    from ringq import data as data_lib
    from ringq.checkpoint import load_model_from_checkpoint
    from ringq.onnx_export import OnnxClassifier, evaluate_onnx, export_checkpoint_onnx
    onnx_path = Path(out_dir) / (Path(checkpoint).stem + ".onnx")
    report = export_checkpoint_onnx(checkpoint, onnx_path)
    test = data_lib.load_split(report["dataset"], args.data_dir, "test")
    ort_result = evaluate_onnx(OnnxClassifier(onnx_path, args.threads), test,
                               batch_size=500, return_logits=True)
    model = load_model_from_checkpoint(checkpoint)[0].eval()
    set_weight_mode(model, "hard")
    mean, std = data_lib.NORMALIZATION[report["dataset"]]
    mean = torch.tensor(mean).view(1, -1, 1, 1)
    std = torch.tensor(std).view(1, -1, 1, 1)
    start = time.perf_counter()
    with torch.no_grad():
        logits = torch.cat([model(data_lib.normalize(test.images[i:i + 500], mean, std))
                            for i in range(0, len(test), 500)]).numpy()
    torch_s = time.perf_counter() - start
    labels = test.labels.numpy()
    ort_top1, torch_top1 = ort_result["logits"].argmax(1), logits.argmax(1)
    return {"checkpoint": str(checkpoint), "onnx": str(onnx_path),
            "file_bytes": report["file_bytes"], "fp32_onnx_bytes": report["fp32_onnx_bytes"],
            "ratio": report["ratio"], "bits": sorted(set(report["bits_per_layer"].values())),
            "forms": sorted({row["form"] for row in report["layers"]}),
            "test_images": len(labels), "onnxruntime_accuracy": ort_result["accuracy"],
            "pytorch_hard_accuracy": 100.0 * float((torch_top1 == labels).mean()),
            "top1_disagreements": int((ort_top1 != torch_top1).sum()),
            "max_abs_logit_diff": float(np.abs(ort_result["logits"] - logits).max()),
            "max_abs_logit": float(np.abs(logits).max()),
            "onnxruntime_s": ort_result["seconds"], "pytorch_s": torch_s}


def format_latency(result):
    lines = [f"{result['onnx']}: {result['onnx_file_bytes']:,} bytes (FP32 ONNX "
             f"{result['fp32_onnx_bytes']:,}; checkpoint {result['checkpoint_bytes']:,})",
             f"{'runtime':<12} {'batch':>5} {'median ms':>10} {'p90 ms':>8} {'images/s':>9} "
             f"{'start-up s':>10} {'peak RSS MiB':>12} {'RSS after import':>16}"]
    for r in result["results"]:
        lines.append(f"{r['runtime']:<12} {r['batch']:>5} {r['median_ms']:>10.2f} "
                     f"{r['p90_ms']:>8.2f} {r['images_per_s']:>9.0f} {r['startup_s']:>10.3f} "
                     f"{r['peak_rss_mib']:>12.1f} {r['rss_after_import_mib']:>16.1f}")
    return "\n".join(lines)


def format_accuracy(rows):
    lines = [f"{'file':<42} {'bytes':>8} {'ORT acc':>8} {'torch acc':>9} {'disagree':>8} "
             f"{'max|dlogit|':>11}"]
    for r in rows:
        lines.append(f"{Path(r['onnx']).name:<42} {r['file_bytes']:>8,} "
                     f"{r['onnxruntime_accuracy']:>8.2f} {r['pytorch_hard_accuracy']:>9.2f} "
                     f"{r['top1_disagreements']:>8} {r['max_abs_logit_diff']:>11.2e}")
    return "\n".join(lines)


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", type=Path,
                        help=f"k-bit checkpoint (repeat for --data-dir; default "
                             f"{DEFAULT_CHECKPOINT.relative_to(ROOT)}); latency uses the first")
    parser.add_argument("--onnx", type=Path, help="where to write the benchmarked ONNX file")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--repeats", type=int, default=30, help="timed passes at batch 1")
    parser.add_argument("--repeats-large", type=int, default=5,
                        help="timed passes at the larger batches")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="intra-op threads for both runtimes (default: every CPU)")
    parser.add_argument("--data-dir", help="also compare accuracies on this test split")
    parser.add_argument("--out-dir", type=Path, help="ONNX files of the accuracy comparison "
                                                     "(default: a temp folder)")
    parser.add_argument("--no-latency", action="store_true", help="accuracy comparison only")
    parser.add_argument("--json", type=Path, help="also write the results here")
    # a worker process (internal)
    parser.add_argument("--worker", choices=("onnxruntime", "pytorch"), help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--shape", type=int, nargs=3, default=[3, 32, 32],
                        help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(ROOT))
    checkpoints = args.checkpoint or [DEFAULT_CHECKPOINT]
    out = {"note": SHARED_NOTE, "cpu_count": os.cpu_count(), "threads": args.threads,
           "platform": platform.platform(), "load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_latency:
            out["latency"] = latency(args, checkpoints[0], args.onnx or Path(tmp) / "bench.onnx")
        if args.data_dir:
            folder = args.out_dir or Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            out["accuracy"] = [accuracy(args, c, folder) for c in checkpoints]
    out["load_average_after"] = os.getloadavg()
    text = json.dumps(out, indent=2)
    print(text)
    print()
    print(SHARED_NOTE + f" (load average before {out['load_average_before'][0]:.2f}, after "
          f"{out['load_average_after'][0]:.2f}, {out['cpu_count']} CPUs)")
    if "latency" in out:
        print(format_latency(out["latency"]))
    if "accuracy" in out:
        print(format_accuracy(out["accuracy"]))
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
