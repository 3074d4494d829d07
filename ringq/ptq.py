"""Post-training quantization as the CLIs offer it: its flags and the FP32-only check."""
from models.convert import post_training_quantize
from models.uniform_layers import MAX_BITS, MIN_BITS, PTQ_SCALES

from .errors import RingqError
from .runtime import int_in


def add_ptq_options(parser, flag):
    """``flag`` K (post-training quantization of an FP32 checkpoint) and --ptq-scale."""
    parser.add_argument(flag, type=int_in(MIN_BITS, MAX_BITS), metavar="K",
                        help="quantize the FP32 checkpoint after training: every layer that ring "
                             "models quantize rounded per output channel to 2**K integer levels "
                             f"times a step ({MIN_BITS}..{MAX_BITS})")
    parser.add_argument("--ptq-scale", choices=PTQ_SCALES, default="mse",
                        help="step of the post-training quantization: max (max|w| / (2**(K-1)-1)) "
                             "or mse (least squared rounding error, searched per channel) "
                             "(default: mse)")


def quantize_after_training(model, mcfg, bits, scale, checkpoint):
    """(K-bit uniform model, its config) of an FP32 checkpoint's model; RingqError otherwise."""
    if mcfg.get("quantization") != "none":
        raise RingqError(f"post-training quantization needs an FP32 checkpoint; {checkpoint} "
                         f"holds a {mcfg.get('quantization')} model")
    return post_training_quantize(model, mcfg, bits, scale)
