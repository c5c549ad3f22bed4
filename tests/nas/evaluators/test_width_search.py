"""A width per expert, searched: a slimmable space (``search.widths`` of scope network), its
supernet, the scores of its narrower sub-networks, the exact optimiser and the samplers."""
from __future__ import annotations

import json
import random
from fractions import Fraction
from pathlib import Path

import optuna
import pytest
import torch

from meme.common.errors import UserError
from meme.common.fastpath import fast_path
from meme.model.config import MemeConfig
from meme.model.diffusion import Diffusion
from meme.model.experts import MultiExpertDenoiser
from meme.model.schedule import load_schedule
from meme.model.supernet import SupernetSpec, load_supernet
from nas import search
from nas.engine import interval_opt
from nas.engine.interval_opt import _config, optimise
from nas.evaluators.supernet_score import SharedScorer
from nas.evaluators.supernet_training import train_all
from nas.space.budget import cost_of
from nas.space.draw import FixedTrial, build_config, encode
from nas.space.proxy import proxy_arch, proxy_config
from nas.space.proxy_data import eval_timesteps, heldout_images, heldout_loss
from nas.space.space import load_space
from tests.nas.evaluators.exhaustive import brute_force_optimum
from tests.tiny_models import single_thread, tiny_space_variant

BUDGET = 0.09      # GFLOPs per step: under full width (0.136), over half width (0.035): widths must mix


def tiny_widths_space(folder: Path) -> Path:
    """search_spaces/tiny.yaml, one macro (base 32; 16 at the proxy's x1/2), every expert at width 1/2
    or 1 of it, GroupNorm groups of 4 channels, N of 1 or 2, hard experts."""
    def edit(d):
        d["target"]["expert"]["group_channels"] = 4
        d["search"].update(num_experts=[1, 2], probs={"choices": [1.0]},
                           widths={"choices": ["1/2", "1"], "scope": "network"})
        d["search"]["macro"]["base_channels"] = [32]
        d["reference"] = None
    return tiny_space_variant(folder, "tiny-widths", edit)


@pytest.fixture(scope="module")
def slim(tmp_path_factory):
    with single_thread():
        folder = tmp_path_factory.mktemp("widths")
        space = tiny_widths_space(folder)
        out = folder / "sn"
        train_all(str(space), out, 3, jobs=1, progress=False)          # the space's widths, by default
        yield load_space(str(space)), out


def random_trial(rng: random.Random, n: int) -> FixedTrial:
    params = {"num_experts": n, **{f"w{i}": rng.randint(1, 2) for i in range(n)}}
    params.update({f"x{i}": rng.random() for i in range(n)})
    params.update({f"e{i}_s{s}": rng.random() for i in range(n) for s in range(2)})
    return FixedTrial(params)


def test_the_supernet_runs_every_width_the_space_draws_and_refuses_less(slim, tmp_path):
    space, out = slim
    entry = json.loads((out / "supernet.json").read_text())["macros"]["b32-r1"]
    spec = SupernetSpec.from_dict(entry["spec"])
    assert spec.widths == ("1/2", "1") and spec.template.group_channels == 4
    with pytest.raises(UserError, match=r"needs \['1/2'\] too"):
        train_all(space.source, tmp_path / "x", 1, jobs=1, progress=False, widths=("1",))
    with pytest.raises(UserError, match="groups of 4 channels"):
        train_all(space.source, tmp_path / "x", 1, jobs=1, progress=False, group_channels=8)


def test_draws_cover_every_width_on_its_own_grid_and_encode_inverts_them(slim):
    space, out = slim
    spec = SupernetSpec.from_dict(json.loads((out / "supernet.json").read_text())["macros"]["b32-r1"]["spec"])
    rng = random.Random(0)
    seen = set()
    for k in range(40):
        cfg = build_config(random_trial(rng, 1 + k % 2), space)
        widths = [space.macro_and_width(e)[1] for e in cfg.experts]
        seen.update(widths)
        for e, w in zip(cfg.experts, widths):
            assert e.base_channels == (16 if w == "1/2" else 32)
            if w == "1/2":   # 16 channels in heads of 8 at stage 1: 1/2 is its only head step
                assert e.high_ratios[0] == "1/2"
            spec.check(proxy_arch(e, space.proxy))               # a sub-network the supernet runs
        assert build_config(FixedTrial(encode(cfg, space)), space, name=cfg.name).hash() == cfg.hash()
    assert seen == {"1/2", "1"}


def test_a_narrow_expert_scores_its_own_sub_network_not_the_full_widths(slim):
    """Sub-networks of one split at two widths are two cache entries, each the held-out loss of
    that width's extracted network."""
    space, out = slim
    scorer = SharedScorer(out, space.proxy)
    half = (Fraction(1, 2), Fraction(1, 2))
    narrow, full = (_config(space, 32, 1, (2, 1), [(w, half)], (), 1.0) for w in ("1/2", "1"))
    encode(narrow, space), encode(full, space)
    a, b = scorer.score(narrow), scorer.score(full)
    assert a.evaluated == b.evaluated == space.proxy.eval_timesteps     # the second found nothing cached
    assert {t["arch"] for t in a.terms} == {"1/2,1/2|2,1@1/2"} and {t["arch"] for t in b.terms} == {"1/2,1/2|2,1"}
    sn = load_supernet(out, scorer.index["macros"]["b32-r1"], torch.device("cpu"))
    p = space.proxy
    model = MultiExpertDenoiser([sn.extract(proxy_config(narrow, p).experts[0])], (0, 1000))
    want = heldout_loss(model, Diffusion(space.diffusion), heldout_images(p), eval_timesteps(1000, p.eval_timesteps),
                        p.seed, torch.device("cpu"), fast_path("cpu", p.precision, model))
    assert a.objective == pytest.approx(want, rel=1e-5) and a.objective != pytest.approx(b.objective, rel=1e-3)


def test_the_exact_optimiser_mixes_widths_as_brute_force_does(slim, tmp_path):
    space, out = slim
    scorer = SharedScorer(out, space.proxy)
    res = optimise(space, scorer, BUDGET, progress=False)
    best = brute_force_optimum(space, scorer, BUDGET)
    assert res["best"]["objective"] == pytest.approx(best[0], rel=1e-9)
    found = MemeConfig.from_yaml(res["best"]["config_yaml"])
    encode(found, space)
    assert cost_of(found).gflops_mean <= BUDGET and {e.base_channels for e in found.experts} & {16}
    # the optimum as a schedule of the supernet: sampled straight from its weights, the same MEME
    assert interval_opt.main(["--space", space.source, "--supernet", str(out), "--budget-gflops", str(BUDGET),
                              "--out", str(tmp_path / "opt"), "--quiet"]) == 0
    _, _, sampled = load_schedule(tmp_path / "opt" / "schedule.yaml")
    assert sampled.experts == proxy_config(found, space.proxy).experts
    assert sampled.resolved_boundaries() == found.resolved_boundaries()


def test_the_samplers_search_widths_and_never_beat_the_exact_optimum(slim, tmp_path):
    space, out = slim
    assert search.main(["--space", space.source, "--budget-gflops", str(BUDGET), "--executor", "optuna",
                        "--supernet", str(out), "--sampler", "tpe", "--trials", "12", "--out", str(tmp_path),
                        "--study", "w", "--rerank-top", "0", "--no-reference", "--quiet"]) == 0
    study = optuna.load_study(study_name="w", storage=f"sqlite:///{tmp_path / 'w' / 'optuna.db'}")
    drawn = {w for t in study.trials for w in t.user_attrs["widths"].split()}
    assert drawn == {"1/2", "1"}
    winner = MemeConfig.load(tmp_path / "w" / "best.yaml")     # and as a schedule sampled from the supernet
    _, _, sampled = load_schedule(tmp_path / "w" / "schedule.yaml")
    assert sampled.experts == proxy_config(winner, space.proxy).experts
    assert interval_opt.main(["--space", space.source, "--supernet", str(out), "--budget-gflops", str(BUDGET),
                              "--against", str(tmp_path / "w"), "--out", str(tmp_path / "opt"), "--quiet"]) == 0
    (vs,) = json.loads((tmp_path / "opt" / "optimum.json").read_text())["against"]
    assert vs["gap_pct"] >= 0 and vs["best_objective"] == pytest.approx(study.best_value)
    curve = [g for g in vs["gap_pct_by_trial"] if g is not None]
    assert len(vs["gap_pct_by_trial"]) == 12 and curve == sorted(curve, reverse=True) and curve[-1] == vs["gap_pct"]
    assert (tmp_path / "opt" / "against.png").stat().st_size > 0
