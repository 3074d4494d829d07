"""Small networks for 28x28 grey images (MNIST, Fashion-MNIST).

Hidden layers come from ``conv(in, out, k, stride, padding)`` and
``linear(in, out)`` (ring or plain) and are each followed by BatchNorm; the
first layer may come from its own ``first_conv`` / ``first_linear`` (e.g. FP32
in a ring network). The classifier is an FP32 ``nn.Linear``, as in the
published ResNets.
"""
import torch.nn as nn


class MLP(nn.Module):
    """784-512-256-classes perceptron."""

    def __init__(self, linear, num_classes=10, in_channels=1, image_size=28, first_linear=None):
        super().__init__()
        self.features = nn.Sequential(
            nn.Flatten(),
            (first_linear or linear)(in_channels * image_size * image_size, 512),
            nn.BatchNorm1d(512), nn.ReLU(),
            linear(512, 256), nn.BatchNorm1d(256), nn.ReLU(),
        )
        self.classifier = nn.Linear(256, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


class LeNet(nn.Module):
    """LeNet-5 style: conv5-20, pool, conv5-50, pool, fc-500, classifier."""

    def __init__(self, conv, linear, num_classes=10, in_channels=1, image_size=28,
                 first_conv=None):
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2
        self.features = nn.Sequential(
            (first_conv or conv)(in_channels, 20, 5, 1, 0),
            nn.BatchNorm2d(20), nn.ReLU(), nn.MaxPool2d(2),
            conv(20, 50, 5, 1, 0), nn.BatchNorm2d(50), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            linear(50 * side * side, 500), nn.BatchNorm1d(500), nn.ReLU(),
        )
        self.classifier = nn.Linear(500, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))
