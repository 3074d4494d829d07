"""Pack a quantized checkpoint into a compact file that loads without pickle.

    python export.py --checkpoint best.pt --output resnet20_ring4.rqp [--half] [--json sizes.json]
    python export.py --checkpoint fp32/last.pt --bits 8 --output lenet_int8.rqp
    python export.py --checkpoint fp32/best.pt --model-only --output resnet20_fp32.pt
    python export.py --checkpoint resnet20_ring4.rqp --onnx --output resnet20_ring4.onnx

Each ring weight is stored as a bit-packed index into its layer's table of
distinct ring values, each uniform K-bit weight as its K-bit integer level (with
one step per output channel); other tensors are stored raw (float16 with --half).
``--bits K`` first quantizes an FP32 checkpoint after training. Load the result
with ``ringq.packing.load_packed``. ``--model-only`` instead writes a training
checkpoint without its optimizer, scheduler, history and RNG state: the file to
ship an FP32 model (it evaluates and warm-starts like the full one). ``--onnx``
instead writes the deployed (hard) network as one ONNX file (opset 25) whose
quantized weights are packed int2 / int4 / int8 initializers, dequantized exactly
(``ringq.onnx_export``; onnxruntime >= 1.24 runs it).
"""
import json
import sys
from collections import Counter
from pathlib import Path

from models.utils import is_quantized_model
from ringq.atomic import save_atomic, write_text_atomic
from ringq.checkpoint import load_model_from_checkpoint, model_only, source_extra
from ringq.errors import CheckpointError, RingqError
from ringq.onnx_export import checkpoint_input, export_onnx
from ringq.packing import export_packed, size_report
from ringq.ptq import add_ptq_options, quantize_after_training
from ringq.runtime import ArgumentParser, run_cli


def get_args_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="source checkpoint of a ring or uniform model (FP32 with --bits)")
    parser.add_argument("--output", required=True, help="packed file to write")
    parser.add_argument("--half", action="store_true",
                        help="store non-quantized tensors (BatchNorm, classifier) as float16")
    add_ptq_options(parser, "--bits")
    parser.add_argument("--model-only", action="store_true",
                        help="write a training checkpoint's (last.pt, best.pt) model, config "
                             "(without paths) and recorded accuracy only (no optimizer, "
                             "scheduler, history, RNG) instead of packing it")
    parser.add_argument("--onnx", action="store_true",
                        help="write the hard network as one ONNX file (opset 25, onnxruntime "
                             ">= 1.24) with the quantized weights packed at 2, 4 or 8 bits, "
                             "instead of a packed .rqp file")
    parser.add_argument("--json", help="also write the size report to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    return parser


def pack_checkpoint(args):
    """Pack ``args.checkpoint`` into ``args.output``; returns the size report (dict).

    The header's ``extra`` records the dataset and the source (file name, epoch,
    recorded best), plus ptq_bits / ptq_scale with --bits: no path.
    """
    model, config, meta = load_model_from_checkpoint(args.checkpoint)
    extra = source_extra(meta, args.checkpoint)
    if args.bits:
        model, config = quantize_after_training(model, config, args.bits, args.ptq_scale,
                                                args.checkpoint)
        extra.update(ptq_bits=args.bits, ptq_scale=args.ptq_scale)
    if not is_quantized_model(model):
        raise CheckpointError(f"nothing to pack: {args.checkpoint} has no quantized layers "
                              f"(pass --bits K to quantize an FP32 checkpoint)")
    export_packed(model, config, args.output, half=args.half, extra=extra)
    return {"checkpoint": str(args.checkpoint), "output": str(args.output),
            **size_report(model, args.output)}


def onnx_checkpoint(args):
    """Write ``args.checkpoint``'s hard network to ``args.output`` as ONNX; the report."""
    if args.half:
        raise RingqError("--onnx stores FP32 tensors as float32; it does not take --half")
    model, config, meta = load_model_from_checkpoint(args.checkpoint)
    metadata = {"model_config": config, "source_file": Path(args.checkpoint).name}
    if args.bits:
        model, config = quantize_after_training(model, config, args.bits, args.ptq_scale,
                                                args.checkpoint)
        metadata.update(model_config=config, ptq={"bits": args.bits, "scale": args.ptq_scale})
    shape, dataset = checkpoint_input(config, meta)
    return {"checkpoint": str(args.checkpoint), "output": str(args.output),
            **export_onnx(model, args.output, shape, dataset, metadata=metadata)}


def strip_checkpoint(args):
    """Write ``args.checkpoint`` without its training state to ``args.output``; the report."""
    if args.bits or args.half:
        raise RingqError("--model-only writes the weights as trained; it takes neither "
                         "--bits nor --half")
    stripped = model_only(args.checkpoint)
    load_model_from_checkpoint(args.checkpoint)  # the weights must rebuild their model
    save_atomic(stripped, args.output)
    return {"checkpoint": str(args.checkpoint), "output": str(args.output),
            "source_bytes": Path(args.checkpoint).stat().st_size,
            "file_bytes": Path(args.output).stat().st_size}


def _format_onnx(report):
    by_bits = Counter(report["bits_per_layer"].values())
    bits = ", ".join(f"{n} layer{'s' * (n > 1)} at {b} bits" for b, n in sorted(by_bits.items()))
    kinds = ", ".join(f"{k} {v:,}" for k, v in report["bytes_by_kind"].items())
    return "\n".join([
        f"wrote {report['output']} (ONNX opset {report['opset']}, IR {report['ir_version']})",
        *([f"  note:                  {report['note']}"] if report.get("note") else []),
        f"  file bytes:            {report['file_bytes']:,} ({kinds})",
        f"  FP32 ONNX bytes:       {report['fp32_onnx_bytes']:,} (the same network unpacked)",
        f"  ratio:                 {report['ratio']:.2f}x",
        f"  quantized layers:      {bits or 'none'}",
    ])


def format_report(report):
    """Short human-readable summary of a size report."""
    if "fp32_onnx_bytes" in report:
        return _format_onnx(report)
    if "source_bytes" in report:
        return (f"wrote {report['output']}: {report['file_bytes']:,} bytes "
                f"(model only; {report['checkpoint']} has {report['source_bytes']:,})")
    by_bits = Counter(report["bits_per_layer"].values())
    bits = ", ".join(f"{n} layer{'s' * (n > 1)} at {b} bit{'s' * (b > 1)}"
                     for b, n in sorted(by_bits.items()))
    weights = report["quantized_weights"]
    return "\n".join([
        f"packed {report['output']}" + (" (float16 raw tensors)" if report["half"] else ""),
        f"  file bytes:            {report['file_bytes']:,}",
        f"  FP32 state-dict bytes: {report['fp32_state_dict_bytes']:,}",
        f"  overall ratio:         {report['ratio']:.2f}x",
        f"  quantized layers:      {report['quantized_layers_ratio']:.2f}x "
        f"({weights:,} weights)",
        f"  bits per layer:        {bits}",
        f"  level entropy:         {report['quantized_entropy_bits'] / weights:.2f} bits per "
        f"quantized weight (stored at {report['quantized_bits'] / weights:.2f})",
    ])


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.onnx and args.model_only:
        raise RingqError("--onnx and --model-only write different files; choose one")
    report = strip_checkpoint(args) if args.model_only else \
        onnx_checkpoint(args) if args.onnx else pack_checkpoint(args)
    if args.json:
        write_text_atomic(json.dumps(report, indent=2) + "\n", args.json)
    if not args.quiet:
        print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
