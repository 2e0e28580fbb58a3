"""A small MobileNet-like CNN (BatchNorm, depthwise convs, residuals, a strided 3x3 conv) briefly
trained on real digits, shared by the reconstruction and recovery tests."""
from __future__ import annotations

import copy
import functools

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c: int, e: int):
        super().__init__()
        self.pw = nn.Conv2d(c, e, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(e)
        self.dw = nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False)
        self.bn2 = nn.BatchNorm2d(e)
        self.pwl = nn.Conv2d(e, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + self.bn3(self.pwl(torch.relu(self.bn2(self.dw(torch.relu(self.bn1(self.pw(x))))))))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.blocks = nn.Sequential(Block(16, 48), Block(16, 48))
        self.conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.bnc = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.bnc(self.conv(self.blocks(x))))
        return self.fc(x.mean((2, 3)))


@functools.lru_cache(maxsize=1)
def _trained():
    from hf_prune.data import load_digits

    torch.manual_seed(0)
    train, val = load_digits(image_size=8)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(80):
        idx = torch.randint(0, len(train), (32,), generator=g)
        loss = nn.functional.cross_entropy(model(train.pixel_values[idx]), train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), train, val


def trained_cnn():
    """(a fresh copy of the trained SmallCNN in eval mode, digits train split, val split) at 8x8."""
    model, train, val = _trained()
    return copy.deepcopy(model), train, val
