"""Run configuration: one table of options, read from defaults, YAML and flags.

Every option has a type, a default, a help line and a check. ``argparse`` flags
and YAML keys are generated from the same table (``--ring-size`` <->
``ring_size``), so the two can never disagree. Precedence: task defaults (or,
on ``--resume``, the checkpoint's recorded config) < ``--config FILE.yaml`` <
command-line flags.
"""
import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from models import MODELS, CIFAR_MODELS, MNIST_MODELS, QUANTIZATIONS, RING_CONFIG_KEYS
from models.uniform_layers import MAX_BITS, MIN_BITS
from models.ring_math import INTERPOLATIONS, RING_LAYOUTS, RING_TYPES

from .atomic import write_text_atomic
from .errors import RingqError
from .precision import PRECISIONS

DATASETS = ("cifar10", "mnist", "fashion-mnist")


@dataclass(frozen=True)
class Option:
    name: str
    type: type
    default: object
    help: str
    choices: tuple = None
    nargs: str = None
    check: object = None  # callable(value) -> error text or None


def _positive(v):
    return None if v > 0 else "must be > 0"


def _non_negative(v):
    return None if v >= 0 else "must be >= 0"


def _ring_size(v):
    return None if 2 <= v <= 256 else "must be between 2 and 256"


def _optional_positive(v):
    return None if v is None or v > 0 else "must be > 0"


def _probability_like(v):
    return None if 0 < v <= 1 else "must be in (0, 1]"


def _bits(v):
    return None if MIN_BITS <= v <= MAX_BITS else f"must be between {MIN_BITS} and {MAX_BITS}"


def _seed(v):
    return None if 0 <= v < 2**32 else "must be in [0, 2**32)"


OPTIONS = [
    # model
    Option("model", str, "resnet20", "architecture", choices=MODELS),
    Option("quantization", str, "ring", "'ring' (ring-quantized), 'uniform' (K-bit integer "
           "levels per output channel, steps learned by LSQ; needs --bits) or 'none' (FP32 "
           "baseline)", choices=QUANTIZATIONS),
    Option("bits", int, None, f"K ({MIN_BITS}..{MAX_BITS}) for --quantization uniform: 2**K "
           "integer levels per output channel", check=_bits),
    Option("ring_size", int, 8, "number of values on the ring (4 = '2-bit', 8 = '3-bit')",
           check=_ring_size),
    Option("ring_type", str, "triangle", "shape of the ring", choices=RING_TYPES),
    Option("ring_layout", str, "published",
           "'published': linspace with endpoint (ring-N holds N/2 distinct values); "
           "'distinct': N distinct values", choices=RING_LAYOUTS),
    Option("interpolation", str, "gaussian", "soft interpolation kernel", choices=INTERPOLATIONS),
    Option("sigma", float, None, "Gaussian kernel width in ring-index units "
           "(default: the published max(0.5, N/32))", check=_optional_positive),
    Option("fp32_first_layer", bool, False, "keep the first layer (a ResNet's stem conv, "
           "LeNet's first conv, the MLP's first linear) in FP32, as most low-bit papers do "
           "(default: ring-quantized, as published)"),
    Option("init_from", str, None, "start a ring or uniform model from this FP32 checkpoint of "
           "the same network (a last.pt or best.pt of a --quantization none run)"),
    Option("distill_from", str, None, "learn also from this frozen FP32 checkpoint of the same "
           "network (a last.pt or best.pt of a --quantization none run, trained on the same "
           "validation split): the loss becomes (1 - A) * cross-entropy + A * T^2 * "
           "KL(teacher || student) at temperature T"),
    Option("distill_weight", float, 0.5, "A: the weight of the teacher's term (0 = plain "
           "cross-entropy)", check=lambda v: None if 0 <= v <= 1 else "must be in [0, 1]"),
    Option("distill_temperature", float, 4.0, "T: the softmax temperature of both sides of "
           "the teacher's term", check=_positive),
    # k-bit recipe
    Option("sigma_final", float, None, "anneal sigma geometrically to this value by the last "
           "epoch (default: no annealing)", check=_optional_positive),
    Option("ste_epochs", int, 0, "last epochs trained with hard (k-bit) weights in the forward "
           "pass and soft-kernel gradients (straight-through)", check=_non_negative),
    Option("select_mode", str, "soft", "weight mode whose validation accuracy selects best.pt "
           "(a uniform model has hard only)",
           choices=("soft", "hard")),
    Option("position_lr_scale", float, 1.0, "learning rate of ring positions relative to --lr",
           check=_positive),
    Option("position_lr_fan_in", bool, False, "also multiply each ring layer's position "
           "learning rate by its fan-in (inputs per output unit; see docs/RESULTS.md)"),
    Option("position_weight_decay", float, None, "weight decay on ring positions "
           "(default: --weight-decay, as published)", check=lambda v: None if v is None or v >= 0
           else "must be >= 0"),
    # data
    Option("dataset", str, "cifar10", "dataset", choices=DATASETS),
    Option("data_dir", str, "./data", "data directory (official files, or an ImageFolder tree "
           "with train/ and test/)"),
    Option("download", bool, True, "download the dataset with torchvision when missing"),
    Option("val_split", int, 0, "hold out this many class-balanced training images for model "
           "selection (0 = published protocol: select on the test set)", check=_non_negative),
    Option("val_seed", int, 1, "seed of the validation split's draw, apart from --seed so "
           "that runs of every seed (and the checkpoints they start from or learn from) hold "
           "out the same images; 1 is the split the seed-1 runs of the recorded sweeps used "
           "(records written before this option drew the split with --seed)", check=_seed),
    Option("subset", int, 0, "train on this many class-balanced training images (0 = all)",
           check=_non_negative),
    Option("loader", str, "memory", "'memory': dataset held on the device, augmented in batch; "
           "'torchvision': DataLoader with per-image transforms", choices=("memory", "torchvision")),
    Option("workers", int, 2, "DataLoader worker processes (torchvision loader)",
           check=_non_negative),
    # optimisation (published defaults)
    Option("epochs", int, 200, "training epochs", check=_positive),
    Option("batch_size", int, 128, "global batch size", check=_positive),
    Option("lr", float, 0.1, "initial learning rate", check=_positive),
    Option("schedule", int, [100, 150], "epochs at which the learning rate is multiplied by "
           "--gamma", nargs="*"),
    Option("gamma", float, 0.1, "learning-rate decay factor", check=_probability_like),
    Option("momentum", float, 0.9, "SGD momentum", check=lambda v: None if 0 <= v < 1
           else "must be in [0, 1)"),
    Option("weight_decay", float, 1e-4, "L2 penalty", check=_non_negative),
    Option("clip_grad", float, 5.0, "max gradient norm (0 disables)", check=_non_negative),
    Option("seed", int, 42, "random seed", check=_seed),
    Option("nan_policy", str, "stop", "on a non-finite loss or gradient: stop the run, or skip "
           "the step", choices=("stop", "skip-step")),
    # system
    Option("device", str, "auto", "auto, cpu or cuda (cuda:N)"),
    Option("precision", str, "auto", "training precision: 'auto' (bf16 autocast where the "
           "hardware runs bf16 natively, else fp32), 'bf16' (refused where it is not native) "
           "or 'fp32'; reported accuracies are always computed in FP32", choices=PRECISIONS),
    Option("channels_last", bool, True, "channels-last memory layout (training and evaluation)"),
    Option("deterministic", bool, False, "deterministic algorithms (cuDNN benchmark off, "
           "CUBLAS_WORKSPACE_CONFIG set): bit-identical resumes on CUDA too"),
    Option("compile", bool, False, "torch.compile the model"),
    Option("output_dir", str, None, "run directory (default: runs/<name>)"),
    Option("quiet", bool, False, "no progress bars"),
]
OPTION_BY_NAME = {o.name: o for o in OPTIONS}

TASK_DEFAULTS = {
    "cifar10": {},
    "mnist": {"model": "lenet", "dataset": "mnist", "epochs": 10, "schedule": [5, 8],
              "ring_size": 8},
}
TASK_MODELS = {"cifar10": CIFAR_MODELS, "mnist": MNIST_MODELS}
TASK_DATASETS = {"cifar10": ("cifar10",), "mnist": ("mnist", "fashion-mnist")}
# What a run trained: a resumed run must keep these (epochs, schedule, lr, ... may change).
FIXED_ON_RESUME = ("model", "quantization", "ring_size", "ring_type", "ring_layout",
                   "interpolation", "sigma", "fp32_first_layer", "dataset", "val_split",
                   "subset", "seed", "batch_size", "loader", "momentum", "weight_decay",
                   "position_weight_decay", "position_lr_scale", "position_lr_fan_in",
                   "select_mode", "bits", "val_seed", "init_source",
                   "distill_source", "distill_weight", "distill_temperature")


# Identities of the checkpoints a run learns from (ringq.identity), recorded beside the options.
SOURCE_KEYS = ("init_source", "distill_source")


def _flag(name):
    return "--" + name.replace("_", "-")


def add_options(parser, task):
    """Add one flag per option, its help showing the task's default.

    Unset flags stay absent from the namespace, so a YAML file given with
    --config can fill them.
    """
    defaults = {o.name: o.default for o in OPTIONS} | TASK_DEFAULTS[task]
    for o in OPTIONS:
        default = defaults[o.name]
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        kwargs = dict(help=f"{o.help} (default: {shown})", default=argparse.SUPPRESS)
        if o.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=o.type, metavar=o.name.upper())
            choices = TASK_MODELS[task] if o.name == "model" else o.choices
            if o.name == "dataset":
                choices = TASK_DATASETS[task]
            if choices:
                kwargs.update(choices=choices, metavar="{" + ",".join(choices) + "}")
            if o.nargs:
                kwargs["nargs"] = o.nargs
        parser.add_argument(_flag(o.name), **kwargs)


def _coerce(name, value, where):
    """Check a value's type against the option table; return the value."""
    o = OPTION_BY_NAME[name]
    if value is None and o.default is None:
        return None
    if o.nargs:
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                  for v in value):
            raise RingqError(f"{where}: key '{name}': expected a list of integers, got {value!r}")
        return value
    if o.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if o.type is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, o.type) or (o.type is int and isinstance(value, bool)):
        raise RingqError(f"{where}: key '{name}': expected {o.type.__name__}, got {value!r}")
    return value


def check_mapping(data, where):
    """The options of mapping ``data`` (read from ``where``), names and types checked."""
    if not isinstance(data, dict):
        raise RingqError(f"{where} must hold a mapping of options, got {type(data).__name__}")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in OPTION_BY_NAME:
            raise RingqError(f"{where}: unknown key '{key}'")
        out[name] = _coerce(name, value, where)
    return out


def load_yaml(path):
    """Read a YAML config file into a dict of known, type-checked options."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RingqError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RingqError(f"cannot read config file {path}: {e}") from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "syntax error"
        raise RingqError(f"config file {path} is not valid YAML: {first}") from None
    return {} if data is None else check_mapping(data, f"config file {path}")


def with_recorded_split(recorded):
    """``recorded`` with ``val_seed`` set as its run drew it: records written before
    ``val_seed`` existed drew the validation split with ``seed``."""
    if "val_seed" in recorded:
        return recorded
    return {**recorded, "val_seed": recorded.get("seed", OPTION_BY_NAME["seed"].default)}


def recorded_config(data, where, task):
    """A config recorded in a checkpoint: known options checked, missing ones defaulted
    (``val_seed`` as :func:`with_recorded_split`); the ``SOURCE_KEYS`` kept."""
    if not isinstance(data, dict):
        raise RingqError(f"{where} is not a mapping")
    cfg = {o.name: o.default for o in OPTIONS}
    cfg.update(check_mapping({k: v for k, v in with_recorded_split(data).items()
                              if k in OPTION_BY_NAME}, where))
    for key in SOURCE_KEYS:
        cfg[key] = data.get(key) if isinstance(data.get(key), dict) else None
    try:
        validate(cfg, task)
    except RingqError as e:
        raise RingqError(f"{where}: {e}") from None
    return cfg


def validate(cfg, task):
    """Raise RingqError naming the first invalid option of a resolved config dict."""
    for o in OPTIONS:
        value = cfg[o.name]
        if o.choices and value not in o.choices:
            raise RingqError(f"{o.name}: invalid value {value!r}; choose from {', '.join(o.choices)}")
        if o.check and value is not None:
            if isinstance(value, float) and not math.isfinite(value):
                raise RingqError(f"{o.name}: must be a finite number, got {value}")
            problem = o.check(value)
            if problem:
                raise RingqError(f"{o.name} {problem}, got {value}")
    if cfg["model"] not in TASK_MODELS[task]:
        raise RingqError(f"model: {cfg['model']!r} is not a {task} model; choose from "
                         f"{', '.join(TASK_MODELS[task])}")
    allowed = TASK_DATASETS[task]
    if cfg["dataset"] not in allowed:
        raise RingqError(f"dataset: {cfg['dataset']!r} is not handled by this script; choose "
                         f"from {', '.join(allowed)}")
    schedule = cfg["schedule"]
    if any(m <= 0 for m in schedule) or list(schedule) != sorted(set(schedule)):
        raise RingqError(f"schedule: milestones must be positive and strictly increasing, got "
                         f"{schedule}")
    if schedule and schedule[-1] > cfg["epochs"]:
        raise RingqError(f"schedule: milestone {schedule[-1]} is beyond --epochs "
                         f"{cfg['epochs']}")
    if cfg["ste_epochs"] > cfg["epochs"]:
        raise RingqError(f"ste_epochs: {cfg['ste_epochs']} is more than --epochs {cfg['epochs']}")
    if cfg["select_mode"] == "hard" and cfg["quantization"] == "none":
        raise RingqError("select_mode: 'hard' needs a ring or uniform model")
    if (cfg["quantization"] == "uniform") != (cfg["bits"] is not None):
        raise RingqError("bits: --quantization uniform needs --bits K" if cfg["bits"] is None
                         else "bits: only for --quantization uniform (a ring's levels come from "
                              "--ring-size)")
    if cfg["init_from"] is not None and cfg["quantization"] == "none":
        raise RingqError("init_from: needs a quantized model (--quantization ring or uniform)")
    if not (cfg["device"] == "auto" or cfg["device"] == "cpu" or cfg["device"].startswith("cuda")):
        raise RingqError(f"device: unknown device {cfg['device']!r}; use auto, cpu or cuda")


def run_name(cfg):
    """Default run directory name, e.g. resnet20_ring4 or lenet_fp32."""
    if cfg["quantization"] == "none":
        return f"{cfg['model']}_fp32"
    if cfg["quantization"] == "uniform":
        return f"{cfg['model']}_uniform{cfg['bits']}"
    name = f"{cfg['model']}_ring{cfg['ring_size']}"
    if cfg["ring_layout"] != "published":
        name += f"_{cfg['ring_layout']}"
    return name


def given_options(args):
    """Options set by ``--config`` and by explicit flags (flags win)."""
    given = vars(args)
    out = load_yaml(given["config"]) if given.get("config") else {}
    out.update({k: v for k, v in given.items() if k in OPTION_BY_NAME})
    return out


def resolve(args, task, base=None):
    """Merge task defaults (or ``base``), ``--config`` YAML and flags into a validated dict."""
    cfg = {o.name: o.default for o in OPTIONS}
    cfg.update(TASK_DEFAULTS[task] if base is None else base)
    cfg.update(given_options(args))
    validate(cfg, task)
    if cfg["output_dir"] is None:
        cfg["output_dir"] = str(Path("runs") / run_name(cfg))
    return cfg


def model_config(cfg, num_classes=10, in_channels=None, image_size=None):
    """The subset of a run config that :func:`models.build_model` reads."""
    uniform = cfg["quantization"] == "uniform"
    keys = ("model", "quantization") + (("bits",) if uniform else RING_CONFIG_KEYS)
    out = {k: cfg[k] for k in keys}
    if cfg.get("fp32_first_layer") and cfg["quantization"] != "none":
        out["fp32_first_layer"] = True  # absent otherwise: earlier checkpoints stay comparable
    out["num_classes"] = num_classes
    if in_channels is not None:
        out["in_channels"] = in_channels
    if image_size is not None:
        out["image_size"] = image_size
    return out


def save_yaml(cfg, path):
    """Write ``cfg`` as YAML, atomically."""
    write_text_atomic(yaml.safe_dump(cfg, sort_keys=False), path)
