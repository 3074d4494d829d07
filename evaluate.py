#!/usr/bin/env python3
"""Evaluate any checkpoint honestly: soft (published) and hard (k-bit) weights.

    python evaluate.py --checkpoint FILE [--data-dir DIR] [--json OUT] [--ptq-bits K]

FILE may be a training checkpoint of this project, a packed k-bit file from
export.py, or one of the original authors' files (the config is inferred).
``--ptq-bits K`` quantizes an FP32 checkpoint after training (K-bit uniform
levels per output channel) and evaluates that network. The dataset is the one
the file records; the data directory is ``--data-dir`` (default ./data). The
best accuracy a file records is printed with its split, epoch and whose it is
(this run's, or the source checkpoint's for a derived file). An ``.onnx`` file
written by ``export.py --onnx`` runs in onnxruntime; ``--reference FILE`` then
also runs FILE's hard network in PyTorch on the same images and reports where the
two disagree.
"""
import json
from pathlib import Path

from models import CIFAR_MODELS
from ringq import data as data_lib
from ringq.atomic import write_text_atomic
from ringq.checkpoint import as_source, load_model_from_checkpoint
from ringq.data import check_data_dir
from ringq.engine import evaluate, evaluate_all_modes, recalibrate_batchnorm
from ringq.errors import RingqError
from ringq.onnx_export import OnnxClassifier, agreement, evaluate_onnx, torch_hard_logits
from ringq.ptq import add_ptq_options, quantize_after_training
from ringq.report import describe_recorded, report_dict
from ringq.runtime import ArgumentParser, int_in, resolve_device, run_cli


def get_args_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, metavar="FILE", help="checkpoint to evaluate")
    parser.add_argument("--data-dir", default="./data",
                        help="official dataset files or an ImageFolder tree with test/ (and "
                             "train/ for --bn-recalibrate) (default: ./data)")
    parser.add_argument("--dataset", choices=data_lib.DATASETS,
                        help="dataset (default: recorded in the checkpoint, else cifar10 for a "
                             "ResNet, fashion-mnist otherwise)")
    parser.add_argument("--batch-size", type=int_in(1), default=500,
                        help="evaluation batch size")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--bn-recalibrate", type=int_in(0), default=0, metavar="N",
                        help="re-estimate BatchNorm statistics with hard weights from N "
                             "training images (no labels) and report hard accuracy after")
    add_ptq_options(parser, "--ptq-bits")
    parser.add_argument("--reference", metavar="FILE",
                        help="with an .onnx FILE: also run this checkpoint's hard network in "
                             "PyTorch on the same images and report the top-1 agreement and "
                             "the largest logit difference")
    parser.add_argument("--no-download", dest="download", action="store_false",
                        help="never download the dataset")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def format_report(report, meta, checkpoint):
    lines = [f"checkpoint      {checkpoint} ({meta.get('source')})",
             f"model           {report['model']} ({report['quantization']}), "
             f"{report['parameters']:,} parameters"]
    if "bits" in report:
        lines.append(f"bits            uniform {report['bits']}-bit, "
                     f"{report['num_distinct_values']} integer levels per output channel"
                     + (f" (post-training, {report['ptq']['scale']} step)" if "ptq" in report
                        else ""))
    if "ring_size" in report:
        lines += [f"ring            size {report['ring_size']}, {report['ring_type']}, "
                  f"layout {report['ring_layout']}",
                  f"bits            nominal {report['nominal_bits']:.2f}, distinct values "
                  f"{report['num_distinct_values']} {report['distinct_values']}, effective "
                  f"{report['effective_bits']:.2f}"]
    for mode in report["accuracy"]:
        lines.append(f"{mode:<15} accuracy {report['accuracy'][mode]:6.2f}%  loss "
                     f"{report['loss'][mode]:.4f}  ({report['num_examples']} test images)")
    if "bn_recalibration" in report:
        r = report["bn_recalibration"]
        lines.append(f"hard + BN recal accuracy {r['accuracy']:6.2f}%  loss {r['loss']:.4f}  "
                     f"(statistics from {r['images']} training images)")
    recorded = describe_recorded(meta)
    if recorded:
        lines.append(f"recorded        {recorded}")
    return "\n".join(lines)


def check_fits(mcfg, test, dataset, checkpoint):
    """RingqError unless the model takes ``test``'s images and predicts all its classes."""
    cifar = mcfg["model"] in CIFAR_MODELS
    channels = mcfg.get("in_channels", 3 if cifar else 1)
    size = mcfg.get("image_size", None if cifar else 28)
    c, h, w = test.images.shape[1:]
    if c != channels or (size is not None and (h, w) != (size, size)):
        wanted = f"{channels}-channel" + (f" {size}x{size}" if size else "")
        raise RingqError(f"{checkpoint} holds a {mcfg['model']} for {wanted} images, but the "
                         f"{dataset} test split has {c}-channel {h}x{w} images")
    classes = mcfg.get("num_classes", 10)
    if len(test.classes) > classes:
        raise RingqError(f"{checkpoint} holds a {classes}-class {mcfg['model']}, but the "
                         f"{dataset} test split has {len(test.classes)} classes")


def check_json_target(path):
    """RingqError unless ``path`` can be created (checked before the evaluation runs)."""
    path = Path(path)
    if path.is_dir() or not path.parent.is_dir():
        raise RingqError(f"cannot write --json {path}: "
                         + ("it is a directory" if path.is_dir() else
                            f"{path.parent} is not a directory"))


def evaluate_onnx_file(args):
    """The report of an ONNX file in onnxruntime on the test split (and its agreement with
    ``--reference``'s hard network in PyTorch)."""
    unsupported = [flag for flag, value in (("--ptq-bits", args.ptq_bits),
                                            ("--bn-recalibrate", args.bn_recalibrate))
                   if value]
    if unsupported:
        raise RingqError(f"{', '.join(unsupported)}: not for an ONNX file (it holds the "
                         f"deployed network as exported)")
    onnx_model = OnnxClassifier(args.checkpoint)
    reference = load_model_from_checkpoint(args.reference) if args.reference else None
    dataset = args.dataset or onnx_model.info["dataset"] or "cifar10"
    data_dir = check_data_dir(args.data_dir, dataset, args.download)
    test = data_lib.load_split(dataset, data_dir, "test", download=args.download)
    result = evaluate_onnx(onnx_model, test, batch_size=args.batch_size,
                           return_logits=reference is not None)
    report = {"accuracy": {"hard": round(result["accuracy"], 4)},
              "num_examples": result["total"], "checkpoint": str(args.checkpoint),
              "source": "onnx", "runtime": "onnxruntime", "dataset": dataset,
              "opset": onnx_model.info["opset"], "session_start_s": round(onnx_model.start_s, 4)}
    if reference is not None:
        logits = torch_hard_logits(reference[0], test, onnx_model.info["mean"],
                                   onnx_model.info["std"], args.batch_size)
        report["reference"] = {"checkpoint": str(args.reference), **agreement(
            result["logits"], logits)}
    return report


def format_onnx_report(report):
    lines = [f"checkpoint      {report['checkpoint']} (ONNX opset {report['opset']}, "
             f"onnxruntime; session start {report['session_start_s'] * 1000:.0f} ms)",
             f"hard            accuracy {report['accuracy']['hard']:6.2f}%  "
             f"({report['num_examples']} {report['dataset']} test images)"]
    if "reference" in report:
        r = report["reference"]
        lines.append(f"against PyTorch same top-1 on {r['same_top1']} of {r['total']} images "
                     f"(hard network of {r['checkpoint']}), largest logit difference "
                     f"{r['max_abs_logit_diff']:.2e}"
                     + (f"; disagreements at {r['disagreements']}" if r["disagreements"]
                        else ""))
    return "\n".join(lines)


def evaluate_checkpoint(args):
    """(report, text) of a PyTorch checkpoint or packed file on the test split: every
    mode, post-training quantization and BatchNorm re-estimation as the flags ask."""
    if args.reference:
        raise RingqError("--reference is for an .onnx checkpoint")
    device = resolve_device(args.device)
    model, mcfg, meta = load_model_from_checkpoint(args.checkpoint)
    if args.ptq_bits:
        model, mcfg = quantize_after_training(model, mcfg, args.ptq_bits, args.ptq_scale,
                                              args.checkpoint)
        meta = as_source(meta, args.checkpoint)
    if args.bn_recalibrate and mcfg["quantization"] == "none":
        raise RingqError("--bn-recalibrate needs a quantized model (a ring or uniform "
                         "checkpoint, or --ptq-bits K)")
    dataset = args.dataset or meta.get("dataset") or (
        "cifar10" if mcfg["model"] in CIFAR_MODELS else "fashion-mnist")
    mean, std = data_lib.NORMALIZATION[dataset]
    data_dir = check_data_dir(args.data_dir, dataset, args.download)
    test = data_lib.load_split(dataset, data_dir, "test", download=args.download)
    check_fits(mcfg, test, dataset, args.checkpoint)

    def loader(ds):
        return data_lib.make_loader("memory", ds, args.batch_size, mean=mean, std=std,
                                    device=device, shuffle=False, augment=False, seed=0)
    model = model.to(device).eval()
    test_loader = loader(test)
    progress = not args.quiet
    if meta.get("source") == "packed":
        results = {"hard": evaluate(model, test_loader, device, "hard", progress=progress)}
    else:
        results = evaluate_all_modes(model, test_loader, device, progress=progress)
    report = report_dict(model, mcfg, results, checkpoint=str(args.checkpoint),
                         source=meta.get("source"), recorded_best=meta.get("recorded_best"),
                         dataset=dataset)
    ptq = {"bits": args.ptq_bits, "scale": args.ptq_scale} if args.ptq_bits else meta.get("ptq")
    if ptq:
        report["ptq"] = ptq
    if args.bn_recalibrate:
        train = data_lib.load_split(dataset, data_dir, "train", download=args.download)
        idx = data_lib.balanced_indices(train.labels, min(args.bn_recalibrate, len(train)), 0)
        used = recalibrate_batchnorm(model, loader(train.subset(idx)), args.bn_recalibrate)
        after = evaluate(model, test_loader, device, "hard", progress=progress)
        report["bn_recalibration"] = {"images": used, "accuracy": round(after["accuracy"], 4),
                                      "loss": round(after["loss"], 6)}
    return report, format_report(report, meta, args.checkpoint)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.json:
        check_json_target(args.json)
    if str(args.checkpoint).endswith(".onnx"):
        report = evaluate_onnx_file(args)
        text = format_onnx_report(report)
    else:
        report, text = evaluate_checkpoint(args)
    print(text)
    if args.json:
        write_text_atomic(json.dumps(report, indent=2) + "\n", args.json)
    return report


if __name__ == "__main__":
    run_cli(main)
