"""Clustered boundaries (meme.sampling.timestep_clusters, nas.space.clusters) and searched sharing
(search.share, search.boundaries.mode: cluster) in a real space file."""
from __future__ import annotations

import json

import optuna
import pytest
import torch
from torch import nn

from meme.model.config import ConfigError, DiffusionConfig
from meme.model.diffusion import Diffusion
from meme.sampling.timestep_clusters import boundaries_from_runs, gradient_profile, segment
from nas.space import clusters
from nas.space.draw import FixedTrial, build_config, encode
from nas.space.space import SPACES_DIR, load_space


def test_segmentation_is_exact_on_blocks_of_known_directions():
    """Rows 0-6 point one way, 7-9 another, 10-19 a third (plus noise): the three runs are found."""
    g = torch.Generator().manual_seed(0)
    dirs = torch.eye(3)
    labels = [0] * 7 + [1] * 3 + [2] * 10
    feats = torch.stack([dirs[c] for c in labels]) + 0.05 * torch.randn(20, 3, generator=g)
    assert segment(feats, 3) == [0, 7, 10]
    assert segment(feats, 1) == [0]
    assert segment(feats, 20) == list(range(20))
    ts = [25 + 50 * i for i in range(20)]
    assert boundaries_from_runs(ts, [0, 7, 10], 1000) == (0, 350, 500, 1000)   # half-way between 325 and 375...


class TwoRegimes(nn.Module):
    """eps = a * x for t < 300 and b * x above: the loss gradient lies along a below 300 and
    along b above, so the gradient similarity has exactly two blocks with their edge at 300."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.3))
        self.b = nn.Parameter(torch.tensor(0.3))

    def forward(self, x, t):
        low = (t < 300).float().view(-1, 1, 1, 1)
        return low * self.a * x + (1 - low) * self.b * x


def test_gradient_clusters_find_the_known_switch_of_a_toy_problem():
    diffusion = Diffusion(DiffusionConfig.ddpm_pixels())
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(8, 1, 4, 4, generator=g), torch.randn(8, 1, 4, 4, generator=g)
    ts = [10 + 20 * i for i in range(50)]          # ..., 290 | 310, ...
    feats = gradient_profile(TwoRegimes(), diffusion, x0, noise, ts)
    assert torch.allclose(feats.norm(dim=1), torch.ones(50))
    assert boundaries_from_runs(ts, segment(feats, 2), 1000) == (0, 300, 1000)




@pytest.fixture()
def space_with_choices(tmp_path, monkeypatch):
    """The tiny space offering sharing and clustered boundaries, with the clusters in a
    cache file written here (the real cache path; computing them trains a network)."""
    text = (SPACES_DIR / "tiny.yaml").read_text()
    text = text.replace("  boundaries: {mode: searchable, weight_levels: 2}\n",
                        "  boundaries: {mode: cluster}\n  share: [none, dec, enc1+dec]\n")
    path = tmp_path / "tiny-shared.yaml"
    path.write_text(text)
    monkeypatch.setenv("MEME_CLUSTERS_CACHE", str(tmp_path / "clusters"))
    clusters._MEMO.clear()
    space = load_space(path)
    cached = {"boundaries": {"2": [0, 150, 1000], "3": [0, 75, 250, 1000], "4": [0, 50, 150, 300, 1000]}}
    (tmp_path / "clusters").mkdir()
    (tmp_path / "clusters" / f"{clusters.cache_key(space, clusters.GRID)}.json").write_text(json.dumps(cached))
    yield space
    clusters._MEMO.clear()


def test_search_offers_sharing_and_clustered_boundaries(space_with_choices):
    space = space_with_choices
    seen_share, seen_bounds = set(), set()
    sampler = optuna.samplers.RandomSampler(seed=3)
    study = optuna.create_study(sampler=sampler)
    for _ in range(120):
        trial = study.ask()
        cfg = build_config(trial, space)
        study.tell(trial, 0.0)
        if cfg.num_experts == 1:
            assert not cfg.share.any and not cfg.boundaries
            continue
        seen_share.add(cfg.share.describe())
        b = cfg.resolved_boundaries()
        seen_bounds.add("cluster" if cfg.boundaries else "uniform")
        if cfg.boundaries:
            assert b == [[0, 150, 1000], [0, 75, 250, 1000]][cfg.num_experts - 2]
        if cfg.share.encoder_stages:   # a shared stage is one ratio for all experts
            assert len({e.high_ratios[0] for e in cfg.experts}) == 1
        assert build_config(FixedTrial(encode(cfg, space)), space, name=cfg.name) == cfg
    assert seen_share == {"none", "dec2", "enc1+dec2"} and seen_bounds == {"uniform", "cluster"}


def test_bad_share_choices_are_refused_in_one_line(tmp_path):
    text = (SPACES_DIR / "tiny.yaml").read_text()
    for bad, msg in (("[none, dex]", "'dex' is not a part"), ("[]", "search.share must be a non-empty list"),
                     ("[dec, dec2]", "listed twice")):
        path = tmp_path / "bad.yaml"
        path.write_text(text.replace("  boundaries: {mode: searchable, weight_levels: 2}\n",
                                     f"  boundaries: {{mode: searchable, weight_levels: 2}}\n  share: {bad}\n"))
        with pytest.raises(ConfigError, match=msg) as err:
            load_space(path)
        assert "\n" not in str(err.value)


def test_sharing_study_rows_are_at_equal_cost_and_name_what_was_refused(space_with_choices):
    from nas.studies import shared_parts_study as sharing_study

    sharing_study.REFUSED.clear()
    rows = sharing_study.rows(space_with_choices, clustered=True)
    tags = [r.tag for r in rows]
    assert tags[0] == "single" and "multi-N4+enc1+dec" in tags and "multi-N2+cluster" in tags
    # the tiny hand design's stage-1 ratios differ (3/4, 1/2): sharing stage 1 is refused, and said so
    assert "hand+enc1+dec" not in tags and "contradicts" in sharing_study.REFUSED["hand+enc1+dec"]
    by = {r.tag: r for r in rows}
    assert by["multi-N4+dec"].cfg.share.decoder_levels == 2 and by["multi-N4+dec"].base == "multi-N4"
    assert by["multi-N2+cluster"].cfg.resolved_boundaries() == [0, 150, 1000]
    gflops = sharing_study.check_equal_cost(rows)
    assert gflops["multi-N4+enc1+dec"] == pytest.approx(gflops["single"])   # sharing never changes per-step cost
    # quarters by hand: t = 100, 300, 600, 900 fall one in each quarter; two in the first here
    assert sharing_study.quarter_means([[100, 1.0], [200, 3.0], [300, 5.0], [600, 7.0], [900, 9.0]], 1000) == \
        [2.0, 5.0, 7.0, 9.0]
