"""CIFAR ResNets (He et al. 2016, 6n+2 layers) in the published layout.

Three stages of 16/32/64 channels with n BasicBlocks each, a 3x3 stem, 1x1
conv + BN shortcuts where the shape changes ("option B"), global average pool
and an FP32 linear classifier. Convolutions come from ``conv``, a callable
``conv(in_ch, out_ch, kernel_size, stride, padding)``: ring or plain; the stem
may use its own ``stem_conv`` (e.g. FP32 in a ring network).
Module names match the original checkpoints.
"""
import torch.nn as nn
import torch.nn.functional as F

from .uniform_layers import UniformLayer

DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9}


class BasicBlock(nn.Module):
    def __init__(self, in_channels, out_channels, stride, conv):
        super().__init__()
        self.conv1 = conv(in_channels, out_channels, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv(out_channels, out_channels, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(conv(in_channels, out_channels, 1, stride, 0),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs; ``num_blocks`` lists the blocks per stage."""

    def __init__(self, num_blocks, conv, num_classes=10, in_channels=3, stem_conv=None):
        super().__init__()
        self.conv1 = (stem_conv or conv)(in_channels, 16, 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(16)
        stages, channels = [], 16
        for width, blocks, stride in zip((16, 32, 64), num_blocks, (1, 2, 2)):
            layers = []
            for s in [stride] + [1] * (blocks - 1):
                layers.append(BasicBlock(channels, width, s, conv))
                channels = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, UniformLayer)):  # latent weights too
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet(name, conv, num_classes=10, in_channels=3, stem_conv=None):
    """Build ``resnet20|resnet32|resnet44|resnet56``."""
    n = DEPTHS[name]
    return CifarResNet([n, n, n], conv, num_classes, in_channels, stem_conv)
