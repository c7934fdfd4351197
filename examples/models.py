"""Networks for the example notebooks, defined here so that no model zoo is needed.

PyPI's torchvision does not import beside the CPU build of torch this project pins, and
nothing may be downloaded, so the notebooks' networks are written out in plain PyTorch:

- :class:`DigitsCNN`: a small CNN with batch norm for scikit-learn's 8×8 digits;
- :class:`CharTransformer`: a character-level causal transformer that *returns its own
  loss* (``model(input_ids=..., labels=...).loss``), as Hugging Face models do;
- :func:`resnet18`: a ResNet-18-style network (BasicBlocks with batch norm) whose width
  shrinks for a quick CPU run.

Every module is kept free of notebook state so the notebooks (and their tests) can build
the same network from a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "CharTransformer", "DigitsCNN", "LMOutput", "ResNet", "resnet18"]


class DigitsCNN(nn.Module):
    """Two conv blocks (conv → batch norm → ReLU) and a linear head for 1×8×8 images.

    Batch norm matters here: under weighted ``nn.DataParallel`` each replica normalises
    its own chunk, which is why adaptive_nb never gives a device a chunk of one sample."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8×8 → 4×4
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(2 * width * 16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))
        return out


@dataclass
class LMOutput:
    """What :class:`CharTransformer` returns: like a Hugging Face ``ModelOutput``, the loss
    travels with the logits. Under weighted ``nn.DataParallel`` adaptive_nb combines the
    replicas' ``loss`` scalars by each replica's share of the batch."""

    loss: torch.Tensor | None
    logits: torch.Tensor


class CharTransformer(nn.Module):
    """A small GPT-like model: token + position embeddings, ``nn.TransformerEncoder``
    layers under a causal mask (each position sees only the characters before it), and a
    linear head. ``forward(input_ids, labels=None)`` returns :class:`LMOutput`; with
    ``labels`` the loss is the mean next-character cross-entropy."""

    def __init__(
        self,
        vocab: int,
        context: int,
        d_model: int = 64,
        heads: int = 4,
        layers: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.context = context
        self.tokens = nn.Embedding(vocab, d_model)
        self.positions = nn.Embedding(context, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model,
            heads,
            dim_feedforward=4 * d_model,
            dropout=dropout,
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> LMOutput:
        length = input_ids.shape[1]
        pos = torch.arange(length, device=input_ids.device)
        h = self.tokens(input_ids) + self.positions(pos)
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=input_ids.device)
        h = self.blocks(h, mask=mask, is_causal=True)
        logits: torch.Tensor = self.head(self.norm(h))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        return LMOutput(loss=loss, logits=logits)


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3×3 convs with batch norm, plus the (projected) input."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet for small images: a 3×3 stem (no max-pool), four stages of BasicBlocks at
    widths w, 2w, 4w, 8w (each after the first halves the resolution), global average
    pooling and a linear head."""

    def __init__(self, blocks: tuple[int, ...], width: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        stages: list[nn.Module] = []
        cin = width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            for j in range(n):
                stages.append(BasicBlock(cin, cout, stride=2 if i > 0 and j == 0 else 1))
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(x))
        out: torch.Tensor = self.head(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))
        return out


def resnet18(classes: int = 10, width: int = 64) -> ResNet:
    """ResNet-18's layout (2, 2, 2, 2 BasicBlocks); ``width=64`` is the original's."""
    return ResNet((2, 2, 2, 2), width=width, classes=classes)
