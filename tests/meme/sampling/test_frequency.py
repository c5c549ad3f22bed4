"""Fourier analysis: the relative log amplitude against hand-made signals, and a real run."""
from __future__ import annotations

import math

import torch

from meme.model.diffusion import Diffusion
from meme.model.experts import build_denoiser
from meme.sampling.frequency import analyse, feature_blocks, high_frequency_table, log_amplitude, relative_diagonal
from tests.meme.training.test_train import tiny_cfg


def test_checkerboard_keeps_pi_and_smooth_map_loses_it():
    h = 8
    i = torch.arange(h)
    checker = ((-1.0) ** (i[:, None] + i[None, :])).expand(2, 3, h, h)   # energy only at (pi, pi)
    smooth = torch.ones(2, 3, h, h)                                      # energy only at 0
    rc = relative_diagonal(log_amplitude(checker))
    rs = relative_diagonal(log_amplitude(smooth))
    # checker: |F| = h*h at pi, ~0 at 0 -> log(64) - log(1e-6) above zero
    assert math.isclose(float(rc[-1]), math.log(h * h + 1e-6) - math.log(1e-6), rel_tol=1e-4)
    assert math.isclose(float(rs[-1]), math.log(1e-6) - math.log(h * h + 1e-6), rel_tol=1e-4)
    assert float(rc[0]) == 0.0 and len(rc) == h // 2 + 1


def test_analysis_covers_every_expert_block_and_t():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    den = build_denoiser(cfg)
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1
    df = analyse(den, Diffusion(cfg.diffusion), x0, timesteps=(100, 900))
    hf = high_frequency_table(df)
    for e, net in enumerate(den.experts):
        n_blocks = len(feature_blocks(net))
        assert n_blocks >= 5
        assert len(hf[hf["expert"] == e]) == 2 * n_blocks
    assert set(df["t"]) == {100, 900} and df["rel_log_amp"].notna().all()
