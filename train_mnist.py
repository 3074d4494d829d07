#!/usr/bin/env python3
"""Train a ring-quantized (or FP32) MLP or LeNet on MNIST / Fashion-MNIST. See --help."""
from ringq.train import main

if __name__ == "__main__":
    main("mnist")
