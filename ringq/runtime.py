"""Process helpers shared by the CLI scripts: devices, seeds, error exits, logged runs."""
import argparse
import contextlib
import os
import platform
import random
import subprocess
import sys
import time

import numpy as np
import torch

from .errors import RingqError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``error: ...`` line on stderr (exit status 2)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"error: {message}\n")


def int_in(minimum, maximum=None):
    """argparse type: an integer >= ``minimum`` (and <= ``maximum`` when given)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(
                f"must be >= {minimum}, got {value}" if maximum is None
                else f"must be between {minimum} and {maximum}, got {value}")
        return value
    return parse


def resolve_device(name):
    """torch.device for ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; RingqError otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RingqError(f"device {name!r} requested but CUDA is not available")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise RingqError(f"unknown device {name!r}") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RingqError(f"device {name!r}: only {torch.cuda.device_count()} CUDA devices")
        return device
    raise RingqError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")


@contextlib.contextmanager
def determinism(deterministic, device):
    """Run a block with deterministic algorithms (or cuDNN autotuning on CUDA), then restore.

    ``deterministic``: torch.use_deterministic_algorithms, cuDNN benchmark off
    and deterministic, and CUBLAS_WORKSPACE_CONFIG=:4096:8 (set before the first
    cuBLAS call, unless already set). Otherwise cuDNN picks the fastest kernels
    (benchmark on), which may differ from run to run.
    """
    previous = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
                torch.backends.cudnn.deterministic)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[1:]


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def library_versions():
    import torchvision
    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "numpy": str(np.__version__)}


def run_logged(cmd, log_path, cwd, env=None):
    """Run ``cmd`` (a list; items made str) in ``cwd``, its output appended to ``log_path``
    after a ``$ command`` line: (exit status, wall-clock seconds)."""
    cmd = [str(c) for c in cmd]
    start = time.perf_counter()
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        code = subprocess.call(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                               env=None if env is None else {**os.environ, **env})
    return code, time.perf_counter() - start


def run_cli(main, argv=None):
    """Call ``main(argv)``; a RingqError becomes one stderr line and exit status 2 (or the
    error's ``exit_code``); Ctrl-C outside a training loop exits 130 without a traceback;
    a standard output closed early (``| head``) ends the command quietly with status 1."""
    try:
        try:
            return main(argv)
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except RingqError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", EXIT_USAGE))
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
