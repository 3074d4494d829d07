"""Quantize a torchvision classifier and train it on CIFAR-10 in a plain loop (docs/OWN_MODELS.md).

    python examples/quantize_torchvision.py --model mobilenet_v2 --data-dir DIR --epochs 30 \\
        --output runs/mobilenet_v2_ring4.rqp
    python examples/quantize_torchvision.py --model resnet18 --data-dir DIR --quantization uniform

The model (resnet18 with a CIFAR stem: 3x3 conv1, stride 1, no max-pool; mobilenet_v2
with a stride-1 stem; 10 classes) is converted by ringq.quantize_model to k-bit ring-4
(``uniform``: LSQ 2-bit; ``none``: FP32; the classifier stays FP32, and with
``--fp32-depthwise`` the depthwise convs too), trained with ringq.Recipe (SGD, lr 0.1, cosine,
weight decay 1e-4, batch 128, crop + flip), evaluated in hard mode on the test split and
written as a packed file (a state dict for FP32) and an ONNX file. The accuracy is that of the
written file, read back (``--half``: the FP32 tensors stored as float16). ``--load FILE`` skips
training and starts from a file this script wrote with the same --model, --quantization and
--fp32-depthwise (to rewrite it with --half, or export it). Progress goes to stderr; stdout is
one JSON line: accuracy, the most distinct weight values of any quantized layer (per output
channel for uniform), the file sizes.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ringq  # noqa: E402  (after the path to the repository)
from ringq import data, packing  # noqa: E402
from ringq.atomic import save_atomic  # noqa: E402
from ringq.checkpoint import safe_load  # noqa: E402
from ringq.engine import evaluate  # noqa: E402
from ringq.onnx_export import export_onnx  # noqa: E402
from ringq.runtime import ArgumentParser, int_in, resolve_device, run_cli, seed_everything  # noqa: E402,E501

MODELS = ("resnet18", "mobilenet_v2")
QUANTIZATIONS = ("ring", "uniform", "none")


def get_args_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="mobilenet_v2")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="ring",
                        help="ring: k-bit ring-4; uniform: LSQ 2-bit; none: FP32")
    parser.add_argument("--fp32-depthwise", action="store_true",
                        help="keep the depthwise convs (groups > 1) FP32 too, beside the "
                             "classifier")
    parser.add_argument("--data-dir", default="./data",
                        help="CIFAR-10: cifar-10-batches-py/ or an ImageFolder train/ + test/")
    parser.add_argument("--epochs", type=int_in(1), default=30)
    parser.add_argument("--subset", type=int_in(0), default=0,
                        help="train on N class-balanced training images and test on N test "
                             "images (0 = all; smoke runs)")
    parser.add_argument("--output", default=None,
                        help="packed file to write (default runs/<model>_<quantization>.rqp)")
    parser.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True,
                        help="also write the ONNX file next to --output")
    parser.add_argument("--half", action="store_true",
                        help="store the packed file's FP32 tensors (BatchNorms, the FP32 "
                             "layers) as float16; the accuracy is measured on them")
    parser.add_argument("--load", default=None, metavar="FILE",
                        help="no training: start from this packed file (a state dict for "
                             "--quantization none) written by this script for the same model")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int_in(1), default=128)
    parser.add_argument("--seed", type=int_in(0), default=1)
    parser.add_argument("--device", default="auto")
    return parser


def build(name):
    """A torchvision classifier for 32x32 images, 10 classes."""
    if name == "resnet18":
        model = torchvision.models.resnet18(weights=None, num_classes=10)
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    else:
        model = torchvision.models.mobilenet_v2(weights=None, num_classes=10)
        model.features[0][0].stride = (1, 1)
    return model


def fp32_layers(model, depthwise):
    """Names of the layers to keep FP32: the classifier (the last nn.Linear), and with
    ``depthwise`` every grouped conv."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    grouped = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    return linears[-1:] + (grouped if depthwise else [])


def split(args, name):
    ds = data.load_split("cifar10", args.data_dir, name)
    return ds.subset(data.balanced_indices(ds.labels, args.subset, args.seed)) \
        if args.subset else ds


def load_trained(model, path, quantized):
    """Fill ``model`` (built and converted as the file's was) from a file this script wrote;
    returns the training facts stored with it ({} for a state dict or an older file)."""
    if quantized:
        return packing.load_packed(path, model=model)[2].get("training", {})
    model.load_state_dict(safe_load(path))
    return {}


def train(model, recipe, loader, args):
    """The plain training loop: SGD over the recipe's groups, cosine learning rate."""
    optimizer = recipe.attach(torch.optim.SGD(recipe.param_groups(args.lr, weight_decay=1e-4),
                                              lr=args.lr, momentum=0.9))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs)
    for epoch in range(1, args.epochs + 1):
        state = recipe.step(epoch)
        loader.set_epoch(epoch)
        model.train()
        start, seen, correct, loss_sum = time.time(), 0, 0, 0.0
        for x, y in loader:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            seen += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += loss.item() * len(y)
        scheduler.step()
        print(f"epoch {epoch}/{args.epochs} sigma {state['sigma']} mode {state['weight_mode']} "
              f"loss {loss_sum / seen:.4f} acc {100 * correct / seen:.2f} "
              f"{time.time() - start:.1f}s", file=sys.stderr, flush=True)


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.half and args.quantization == "none":
        parser.error("--half is for packed files; --quantization none writes a state dict")
    device = resolve_device(args.device)
    quantized = args.quantization != "none"
    output = Path(args.output or f"runs/{args.model}_{args.quantization}."
                  f"{'rqp' if quantized else 'pt'}")
    seed_everything(args.seed)
    test_set = split(args, "test")
    model = build(args.model)
    fp32_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if quantized:
        ringq.quantize_model(model, args.quantization, keep_fp32=fp32_layers(
            model, args.fp32_depthwise))
    model.to(device)
    mean, std = data.NORMALIZATION["cifar10"]
    common = dict(mean=mean, std=std, device=device, seed=args.seed)
    if args.load:
        training = load_trained(model, args.load, quantized)
    else:
        train_set = split(args, "train")
        loader = data.make_loader("memory", train_set, args.batch_size, shuffle=True,
                                  augment=True, **common)
        train(model, ringq.Recipe(model, args.epochs), loader, args)
        training = {"epochs": args.epochs, "train_images": len(train_set), "seed": args.seed}
    output.parent.mkdir(parents=True, exist_ok=True)
    if quantized:
        file_bytes = ringq.save_packed(model, output, half=args.half,
                                       extra={"training": training})["file_bytes"]
        ringq.load_packed(output, model)
    else:
        save_atomic(model.state_dict(), output)
        file_bytes = output.stat().st_size
    test_loader = data.make_loader("memory", test_set, 500, shuffle=False, augment=False,
                                   **common)
    result = evaluate(model, test_loader, device, mode="hard" if quantized else None)
    report = {"model": args.model, "quantization": args.quantization,
              "fp32_depthwise": args.fp32_depthwise, "epochs": training.get("epochs"),
              "train_images": training.get("train_images"),
              "test_images": result["num_examples"], "loaded_from": args.load,
              "accuracy": round(result["accuracy"], 2),
              "max_distinct_levels": max(ringq.distinct_levels(model).values(), default=None),
              "levels_counted_per": {"ring": "layer", "uniform": "output channel"}.get(
                  args.quantization), "output": str(output), "half": args.half,
              "bytes": file_bytes, "fp32_state_dict_bytes": fp32_bytes,
              "ratio": round(fp32_bytes / file_bytes, 2)}
    if args.onnx:
        onnx_path = output.with_suffix(".onnx")
        report.update(onnx=str(onnx_path), onnx_bytes=export_onnx(
            model, onnx_path, (1, 3, 32, 32), "cifar10",
            metadata={"model": args.model, "quantization": args.quantization})["file_bytes"])
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    run_cli(main)
