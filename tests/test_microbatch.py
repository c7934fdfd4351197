"""Micro-batching gives the full batch's gradient and loss."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch import nn

from adaptive_nb.engine.microbatch import run_micro_batches, split_batch

Pair = namedtuple("Pair", ["x", "y"])


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def step(model: nn.Module, batch: dict[str, object]) -> torch.Tensor:
    pair = batch["pair"]
    assert isinstance(pair, Pair)
    assert batch["tag"] == "keep"  # non-tensors reach every piece
    return nn.functional.cross_entropy(model(pair.x), pair.y)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 7])
def test_same_gradient_and_loss_as_full_batch(m: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))
    x = torch.randn(23, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (23,))
    model = model.double()
    batch = {"pair": Pair(x, y), "tag": "keep"}
    full = step(model, batch)
    full.backward()
    g_full = grads(model)
    model.zero_grad(set_to_none=True)
    loss, sizes = run_micro_batches(step, model, batch, m)
    assert sum(sizes) == 23 and len(sizes) == m
    assert loss.item() == pytest.approx(full.item(), rel=1e-12)
    for a, b in zip(grads(model), g_full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_split_batch_nested_structures() -> None:
    x = torch.arange(10)
    other = torch.zeros(3)  # not batch-shaped: passed whole
    parts = split_batch({"a": [x, (x, 5)], "b": other, "n": Pair(x, x)}, [4, 6])
    assert len(parts) == 2
    assert parts[0]["a"][0].tolist() == [0, 1, 2, 3]
    assert parts[1]["a"][1][0].tolist() == [4, 5, 6, 7, 8, 9]
    assert parts[1]["a"][1][1] == 5
    assert parts[0]["b"] is other
    assert isinstance(parts[1]["n"], Pair) and parts[1]["n"].y.tolist() == list(range(4, 10))


def test_before_each_sees_every_piece() -> None:
    model = nn.Linear(2, 1)
    seen: list[tuple[int, int]] = []
    x = torch.randn(9, 2)

    def s(mod: nn.Module, b: torch.Tensor) -> torch.Tensor:
        return mod(b).pow(2).mean()

    run_micro_batches(s, model, x, 4, before_each=lambda i, n: seen.append((i, n)))
    assert seen == [(0, 3), (1, 2), (2, 2), (3, 2)]
