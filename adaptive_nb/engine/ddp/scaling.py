"""The arithmetic that keeps a DDP step's gradient equal to the full-batch gradient under
uneven shares: which contiguous slice of the global batch each rank takes, how a rank
splits its slice into micro-batches, and the factor by which each piece's loss is scaled.

DDP averages gradients over the ``W`` ranks: ``g = (1/W)·Σ gᵢ``. Rank ``i`` computes the
mean loss over its ``bᵢ`` samples; the full-batch mean gradient is ``(1/B)·Σ bᵢ·gᵢ``. So a
piece of ``n`` samples has its mean loss scaled by ``n·W/B`` before ``backward``; a piece
of 0 samples is scaled by exactly 0 (its ``mean()`` may be NaN, the product's gradient is
still 0 everywhere, and its value is never reported). No torch here: the ranks and the
kernel compute the same integers from the same plan.

Why a rank with no samples runs an empty slice rather than ``torch.distributed``'s
``Join``: a joined rank shadows the all-reduce but never receives the averaged gradient
(its optimizer would step without it and its parameters drift from the others'), and
``Join`` adds a collective to every forward. An empty forward/backward through the DDP
wrapper joins the same collectives as every other rank and leaves it the same averaged
gradient. It asks that the step accept a batch of 0 samples (most layers do; a
``view(0, -1)`` does not); the empty rank's buffers (BatchNorm statistics) are restored
after it. Tested against a plain loop with a zero share on rank 0 and on a middle rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...layout import chunk_sizes, micro_batch_sizes

__all__ = ["RankLayout", "loss_weight", "rank_layout", "slice_bounds"]


@dataclass(frozen=True)
class RankLayout:
    """One global batch laid out over the ranks: ``sizes[r]`` samples for rank ``r`` (a
    contiguous slice, ranks in order), split into ``pieces[r]`` micro-batches (the last
    piece is the one whose backward all-reduces; it may be empty)."""

    sizes: tuple[int, ...]
    pieces: tuple[tuple[int, ...], ...]

    @property
    def total(self) -> int:
        return sum(self.sizes)


def rank_layout(
    shares: Sequence[float],
    total: int,
    micro_batches: int = 1,
    caps: Sequence[int | None] | None = None,
) -> RankLayout:
    """Per-rank sample counts and micro-batch pieces for a global batch of ``total``.

    Shares as in :func:`adaptive_nb.layout.chunk_sizes` (no rank is required to get
    samples: in DDP every rank holds the whole model). ``caps`` bound each rank's samples
    per micro-batch; when they cannot hold a micro-batch, more micro-batches are used (as
    the DataParallel engine does). Every rank gets at least one piece (possibly empty), so
    every rank joins the step's all-reduce exactly once."""
    n = len(shares)
    if n == 0:
        raise ValueError("no ranks")
    m = max(1, int(micro_batches))
    while True:
        sizes = micro_batch_sizes(total, m) if total > 0 else [0]
        try:
            per_micro = [chunk_sizes(shares, s, caps) for s in sizes]
        except ValueError:
            if m >= max(total, 1):
                raise
            m += 1
            continue
        break
    rank_sizes = tuple(sum(chunks[r] for chunks in per_micro) for r in range(n))
    pieces = []
    for r in range(n):
        own = tuple(chunks[r] for chunks in per_micro if chunks[r] > 0)
        pieces.append(own or (0,))
    return RankLayout(rank_sizes, tuple(pieces))


def slice_bounds(sizes: Sequence[int], rank: int) -> tuple[int, int]:
    """``[start, stop)`` of ``rank``'s contiguous slice of the global batch."""
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def loss_weight(piece: int, total: int, world_size: int) -> float:
    """Factor for a piece's *mean* loss so that DDP's average over ``world_size`` ranks is
    the full-batch mean gradient: ``piece·W/B`` (0 for an empty piece or batch)."""
    if piece <= 0 or total <= 0:
        return 0.0
    return piece * world_size / total
