"""Small torch networks for the bring-your-own-model tests (deterministic weights)."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv-relu-pool-conv (the last conv has no ReLU: negative values) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


class BasicBlock(nn.Module):
    """A ResNet basic block: conv-bn-relu-conv-bn, plus the (downsampled) input, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                   nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 7, 2, 3, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.stage1 = BasicBlock(16, 16)
        self.stage2 = BasicBlock(16, 32, stride=2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stage2(self.stage1(self.stem(x))).mean((2, 3)))


def small_cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN().eval()


def tiny_resnet() -> TinyResNet:
    torch.manual_seed(1)
    net = TinyResNet()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so bn2 goes negative
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
    return net.eval()


def plain_sequential(seed: int = 2) -> nn.Sequential:
    """A bare nn.Sequential: its submodules are named "0", "1", ... (torch's exporter refuses
    all-digit output names). ``seed`` gives other weights of the same shape."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 5, stride=4, padding=2), nn.ReLU()).eval()


def other_plain_sequential() -> nn.Sequential:
    return plain_sequential(seed=3)


class _Dead(nn.Module):
    """A layer that is zero on every image (a ReLU after a large negative bias), and a tap of
    zero channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4, padding=1)
        with torch.no_grad():
            self.conv.bias.fill_(-1e4)
        self.relu = nn.ReLU()
        self.empty = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv(x))
        return y + 0 * self.empty(y[:, :0]).sum()


def dead_layer() -> _Dead:
    torch.manual_seed(4)
    return _Dead().eval()
