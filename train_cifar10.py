#!/usr/bin/env python3
"""Train a ring-quantized (or FP32) ResNet on CIFAR-10. See --help and README.md."""
from ringq.train import main

if __name__ == "__main__":
    main("cifar10")
