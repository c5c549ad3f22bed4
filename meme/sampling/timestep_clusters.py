"""Interval boundaries from data: timesteps grouped by how alike a network's gradients are.

The multi-stage multi-decoder framework (CVPR'24) divides [0, T) into stages by
clustering timesteps instead of cutting it into equal parts, so that timesteps whose
training signals interfere land in different experts. The signal chosen here is the
one that interference is made of: the gradient of the eps-MSE with respect to the
parameters of a small reference network trained on all t. Two timesteps whose
gradients point the same way are helped by one set of weights; two whose gradients
disagree pull one network in opposite directions.

* **Profile** (:func:`gradient_profile`): at K timesteps of a grid, the gradient of the
  loss on one fixed batch (fixed images and noise, the same at every t), flattened and
  scaled to unit length, so similarity is cosine similarity.
* **Segmentation** (:func:`segment`): experts own contiguous intervals, so the clusters
  must be contiguous runs of the grid. The split of K ordered points into N runs that
  minimises the within-run sum of squared distances to the run's mean (k-means' own
  objective under the contiguity constraint) is found exactly by dynamic programming
  in O(N K^2), rather than by k-means followed by repairs.
* Boundaries fall half-way between the last grid timestep of one run and the first of
  the next (:func:`boundaries_from_runs`).

A per-t loss profile would be cheaper, but a loss level says how hard a timestep is,
not whether two timesteps want the same weights; equal losses can come from opposite
gradients.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from meme.model.diffusion import Diffusion


def gradient_profile(net: nn.Module, diffusion: Diffusion, x0: torch.Tensor, noise: torch.Tensor,
                     timesteps: Sequence[int]) -> torch.Tensor:
    """[K, P]: the unit-length loss gradient of ``net`` at each timestep (one fixed batch)."""
    params = [p for p in net.parameters() if p.requires_grad]
    rows = []
    for t in timesteps:
        tt = torch.full((x0.shape[0],), int(t), dtype=torch.long, device=x0.device)
        loss = diffusion.training_loss(net, x0, tt, noise)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        g = torch.cat([(gr if gr is not None else torch.zeros_like(p)).reshape(-1).float()
                       for gr, p in zip(grads, params)])
        rows.append(g / g.norm().clamp_min(1e-12))
    return torch.stack(rows)


def segment(features: torch.Tensor, n: int) -> list[int]:
    """Start index of each of ``n`` contiguous runs of the rows of ``features`` (first is 0)
    minimising the total within-run sum of squared distances to the run mean (exact)."""
    k = features.shape[0]
    if not 1 <= n <= k:
        raise ValueError(f"cannot split {k} timesteps into {n} runs")
    f = features.double()
    csum = torch.cat([torch.zeros(1, f.shape[1], dtype=f.dtype), f.cumsum(0)])
    csq = torch.cat([torch.zeros(1, dtype=f.dtype), (f * f).sum(1).cumsum(0)])

    def cost(i: int, j: int) -> float:   # rows i..j-1
        s = csum[j] - csum[i]
        return float(csq[j] - csq[i] - (s @ s) / (j - i))

    inf = float("inf")
    best = [[inf] * (k + 1) for _ in range(n + 1)]
    arg = [[0] * (k + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for m in range(1, n + 1):
        for j in range(m, k - (n - m) + 1):
            for i in range(m - 1, j):
                c = best[m - 1][i] + cost(i, j)
                if c < best[m][j]:
                    best[m][j], arg[m][j] = c, i
    starts, j = [], k
    for m in range(n, 0, -1):
        j = arg[m][j]
        starts.append(j)
    return starts[::-1]


def boundaries_from_runs(timesteps: Sequence[int], starts: Sequence[int], T: int) -> tuple[int, ...]:
    """N+1 boundaries 0 < ... < T: each inner one half-way between two runs' neighbouring timesteps."""
    inner = [(int(timesteps[s - 1]) + int(timesteps[s]) + 1) // 2 for s in starts[1:]]
    return (0, *inner, T)
