"""Models that return their own loss, under uneven shares: each replica's loss is weighted
by its share of the batch, so the gradient is the full batch's. CPU: the CUDA parts of
``nn.DataParallel.forward`` (replicate, parallel_apply, gather) are stubbed."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import nn

from adaptive_nb.engine.dataparallel import WeightedDataParallel
from adaptive_nb.engine.replica_loss import gather_weighted


class ModelOutputLike(OrderedDict[str, Any]):
    """What a Hugging Face ``ModelOutput`` is to ``nn.DataParallel``: a dict with attribute
    access, rebuilt by ``gather`` from (key, value) pairs."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(name) from err


@dataclasses.dataclass
class PlainOutput:
    loss: torch.Tensor
    logits: torch.Tensor
    note: str = "kept"


class SelfLossModel(nn.Module):
    """Returns its own mean-squared-error loss, as ``kind`` says."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.kind = kind

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        logits = self.body(x)
        loss = nn.functional.mse_loss(logits.squeeze(1), y)
        if self.kind == "scalar":
            return loss
        if self.kind == "dict":
            return {"loss": loss, "logits": logits}
        if self.kind == "model_output":
            return ModelOutputLike(loss=loss, logits=logits)
        return PlainOutput(loss=loss, logits=logits)


def _stub_data_parallel(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    chunks: list[list[int]] = []

    def scatter(
        devices: Sequence[int], sizes: Sequence[int], dim: int, t: torch.Tensor
    ) -> list[torch.Tensor]:
        chunks.append(list(sizes))
        return list(torch.split(t, list(sizes), dim=dim))

    def gather(self: nn.DataParallel, outputs: list[Any], device: int) -> Any:  # type: ignore[type-arg]
        assert all(isinstance(t, torch.Tensor) for t in outputs)  # walked by the wrapper
        if all(t.dim() == 0 for t in outputs):
            return torch.stack(outputs)  # Gather's "scalars become a vector"
        return torch.cat(outputs)

    monkeypatch.setattr("adaptive_nb.engine.weighted._torch_scatter", scatter)
    monkeypatch.setattr(nn.DataParallel, "replicate", lambda self, m, ids: [m for _ in ids])
    monkeypatch.setattr(
        nn.DataParallel,
        "parallel_apply",
        lambda self, reps, inp, kw: [r(*i, **k) for r, i, k in zip(reps, inp, kw, strict=True)],
    )
    monkeypatch.setattr(nn.DataParallel, "gather", gather)
    return chunks


def _wrapped(model: nn.Module, shares: list[float]) -> WeightedDataParallel:
    dp = WeightedDataParallel(model, [0, 1, 2])
    dp.device_ids, dp.dim, dp.output_device = [0, 1, 2], 0, 0  # as with CUDA present
    dp.src_device_obj = torch.device("cpu")
    dp.set_plan(shares)
    return dp


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(10, 4, generator=g), torch.randn(10, generator=g)


@pytest.mark.parametrize("kind", ["scalar", "dict", "model_output", "dataclass"])
def test_own_loss_under_uneven_shares_gives_the_full_batch_gradient(
    monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    chunks = _stub_data_parallel(monkeypatch)
    x, y = _batch()
    reference = SelfLossModel(kind)
    out = reference(x, y)
    full_loss = out if kind == "scalar" else out["loss"] if isinstance(out, dict) else out.loss
    full_loss.backward()

    model = SelfLossModel(kind)
    result = _wrapped(model, [0.6, 0.3, 0.1])(x, y)
    assert chunks[-1] == [6, 3, 1]
    if kind == "scalar":
        loss = result
    elif kind == "dataclass":
        assert isinstance(result, PlainOutput) and result.note == "kept"
        loss = result.loss
        assert result.logits.shape == (10, 1)
    else:
        assert type(result) is type(out)
        loss = result["loss"]
        assert result["logits"].shape == (10, 1)
    assert loss.dim() == 0  # one scalar, so a `loss.mean()` written for DataParallel is a no-op
    torch.testing.assert_close(loss, full_loss.detach())
    loss.backward()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad)


def test_equal_weights_would_be_the_wrong_gradient() -> None:
    """Why the weighting matters: the plain DataParallel mean of [6, 3, 1]-sample losses is
    not the full-batch loss."""
    x, y = _batch()
    model = SelfLossModel("scalar")
    parts = [model(xs, ys) for xs, ys in zip(x.split([6, 3, 1]), y.split([6, 3, 1]), strict=True)]
    full = model(x, y)
    assert not torch.allclose(torch.stack(parts).mean(), full)
    weighted = gather_weighted(parts, [0.6, 0.3, 0.1], torch.stack)
    torch.testing.assert_close(weighted, full)


def test_non_scalar_and_integer_values_gather_as_usual() -> None:
    a = {"logits": torch.ones(2, 3), "count": torch.tensor(2), "tag": "x", "none": None}
    b = {"logits": torch.zeros(1, 3), "count": torch.tensor(1), "tag": "y", "none": None}
    out = gather_weighted([a, b], [2 / 3, 1 / 3], lambda ts: torch.cat([t.reshape(-1) for t in ts]))
    assert out["logits"].shape == (9,) and out["count"].tolist() == [2, 1]
    assert out["tag"] == "x" and out["none"] is None
    with pytest.raises(ValueError, match="weights"):
        gather_weighted([a, b], [1.0], torch.stack)
