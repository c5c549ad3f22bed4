"""Promotion and the Table-1 comparison end to end on the tiny space: a real search,
real trainings on Fashion-MNIST, real sampling and a real FID (tiny sizes)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from meme.common.errors import UserError
from meme.model.config import MemeConfig
from nas import search
from nas.engine.report import ranked
from nas.promote import promote
from nas.promote.export import open_study
from nas.promote.promote import Design, check_target_data
from nas.space.space import load_space
from nas.studies import compare

REPO = Path(__file__).resolve().parents[3]
TINY = load_space("tiny")
STEPS = TINY.promote.steps  # tiny.yaml promote.steps


@pytest.fixture(autouse=True)
def _private_caches(tmp_path_factory, monkeypatch):
    """FID statistics and MAC counts in a private folder (subprocesses inherit it)."""
    root = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("MEME_CACHE_DIR", str(root / "meme-cache"))
    monkeypatch.setenv("MEME_MACS_CACHE", str(root / "macs-cache"))


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("promote")
    rc = search.main(["--space", "tiny", "--budget-gflops", "1", "--executor", "optuna", "--trials", "3",
                      "--out", str(out), "--study", "s", "--quiet", "--rerank-top", "1", "--rerank-seeds", "2"])
    assert rc == 0
    return out / "s"


@pytest.fixture(scope="module")
def promoted(tiny_study) -> Path:
    """The study's best trial and its reference promoted once; the tests below read or reuse it."""
    assert promote.main(["--study", str(tiny_study), "--top", "1", "--jobs", "2"]) == 0
    return tiny_study / "promoted"


def _trained_steps(run: Path) -> int:
    return int(pd.read_csv(run / "metrics.csv").step.max())


def test_promote_trains_samples_and_scores_on_the_target_data(promoted):
    out = promoted
    runs = pd.read_csv(out / "promoted.csv")
    assert sorted(runs.design) == ["rank1", "reference-tiny-hand"]
    for row in runs.itertuples():
        run = Path(row.run)
        # the target's data and shape, not the proxy's, and the same steps whatever N
        opts = json.loads((run / "options.json").read_text())
        assert opts["data"] == "fashion-mnist" and opts["steps"] == STEPS and opts["seed"] == 1
        assert MemeConfig.load(run / "config.yaml").data == TINY.data
        assert _trained_steps(run) == STEPS
        ev = json.loads((run / "eval.json").read_text())
        assert ev["n"] == TINY.promote.fid_samples and ev["n_ref"] == TINY.promote.fid_reference
        assert ev["resolution"] == TINY.data.resolution and 0 < row.fid == ev["fid"]
    assert "fid_mean" in (out / "promoted.md").read_text()


def test_promote_resumes_without_redoing_finished_stages(tiny_study, promoted):
    logs = sorted(promoted.glob("*/seed1/promote.log"))
    assert len(logs) == 2  # rank1 and the reference
    before = [p.read_text() for p in logs]
    assert promote.main(["--study", str(tiny_study), "--top", "1"]) == 0
    assert [p.read_text() for p in logs] == before  # no stage ran again


def test_promote_refuses_a_run_trained_with_other_settings(tiny_study, promoted, capsys):
    assert promote.main(["--study", str(tiny_study), "--top", "1", "--steps", str(STEPS + 1)]) == 2
    assert "was trained with other settings" in capsys.readouterr().err


def test_latent_target_without_latent_data_is_refused_before_anything_is_written(tmp_path):
    study = REPO / "results" / "curated" / "meme-ffhq256-b95"  # a real study of a 3x64x64 latent target
    out = tmp_path / "promoted"
    proc = subprocess.run([sys.executable, "-m", "nas.promote.promote", "--study", str(study), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "latent" in lines[0] and "--data" in lines[0]
    assert not out.exists()


def test_latent_target_refuses_images_and_latents_it_cannot_decode(tmp_path):
    cfg = load_space("meme_ffhq256").reference
    with pytest.raises(UserError, match="not a latent file"):
        check_target_data(cfg, "fashion-mnist")
    import numpy as np
    np.save(tmp_path / "latents.npy", np.zeros((4, 3, 64, 64), dtype=np.float32))
    with pytest.raises(UserError, match="without autoencoder metadata"):  # FID needs the decoder
        check_target_data(cfg, str(tmp_path / "latents.npy"))
    # accepted with the record (tests/meme/data/test_autoencoder.py); the shape is checked when loaded


def test_compare_four_designs_at_equal_cost(tiny_study):
    out = tiny_study / "compare"
    # tiny's search mixes base widths, so its winner may cost more or less than the hand design
    assert compare.main(["--study", str(tiny_study), "--seeds", "2", "--jobs", "2", "--tolerance", "10"]) == 0
    df = pd.read_csv(out / "comparison.csv")
    assert list(df.design) == ["single", "multi-expert", "hand", "search"]
    assert list(df.N[:3]) == [1, 2, 2]
    assert (df.seeds == 2).all() and (df.train_images == STEPS * TINY.promote.batch_size).all()
    assert (df.fid_mean > 0).all() and (df.sample_img_per_s > 0).all()
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 8 and sorted(set(runs.seed)) == [1, 2]
    hand = df.set_index("design").loc["hand"]
    assert hand.fid_mean == pytest.approx(runs[runs.design == "hand"].fid.mean())
    assert hand.fid_std == pytest.approx(runs[runs.design == "hand"].fid.std())
    for d in df.design:
        assert (out / "grids" / f"{d}.png").is_file()
    assert (out / "comparison.png").is_file() and "| single |" in (out / "comparison.md").read_text()
    rec = json.loads((out / "comparison.json").read_text())
    assert [d["design"] for d in rec["designs"]] == list(df.design) and len(rec["runs"]) == 8
    assert rec["recipe"]["steps"] == STEPS
    # single and multi-expert share the hand design's middle expert
    single = MemeConfig.load(out / "runs" / "single" / "seed1" / "design.yaml")
    multi = MemeConfig.load(out / "runs" / "multi-expert" / "seed1" / "design.yaml")
    assert multi.experts == (single.experts[0],) * 2


def test_compare_refuses_unequal_cost_and_a_single_seed(tiny_study, capsys):
    hand = TINY.reference
    wide = MemeConfig.from_dict({**hand.to_dict(), "name": "wide",
                                 "experts": [{**e, "base_channels": 64} for e in hand.to_dict()["experts"]]}, "t")
    with pytest.raises(UserError, match="not at equal per-step cost"):
        compare.check_equal_cost([Design("hand", hand), Design("search", wide)], 0.05)
    gflops = compare.check_equal_cost([Design("hand", hand), Design("search", hand)], 0.05)
    assert gflops["search"] == gflops["hand"] > 0
    assert compare.main(["--study", str(tiny_study), "--seeds", "1"]) == 2
    assert "--seeds must be >= 2" in capsys.readouterr().err


# ---- experts from shared weights, and the crossover study ---------------------------------

def test_branched_promotion_resumes_across_the_split(tiny_study):
    out = tiny_study / "promoted-branch"
    args = ["--study", str(tiny_study), "--top", "1", "--init", "branch", "--out", str(out),
            "--", "--snapshot-at", "2"]
    assert promote.main(args) == 0
    run = out / "reference-tiny-hand" / "seed1"           # N = 2 (the search's winner may be one network)
    opts = json.loads((run / "options.json").read_text())
    assert opts["branch_at"] == 0.5 and opts["split_optimizer"] == "carry"
    from meme.common import checkpoint
    from meme.training.compute import run_compute
    cfg = MemeConfig.load(run / "config.yaml")
    want = run_compute(cfg, STEPS, TINY.promote.batch_size, split_at=STEPS // 2)
    assert json.loads((run / "compute.json").read_text())["charged_tflops"] == pytest.approx(want.charged_tflops)
    straight = checkpoint.load(run / "checkpoints" / "last.pt")
    snap = checkpoint.load(run / "checkpoints" / "step0000002.pt")
    assert snap["phase"] == "parent" and straight["phase"] == "experts"
    # interrupted in the parent phase: the pipeline resumes from there, through the split, to the same weights
    (run / "checkpoints" / "step0000002.pt").replace(run / "checkpoints" / "last.pt")
    for done in ("train.done", "eval.json", "heldout.json", "samples/sampling.json"):
        (run / done).unlink()
    assert promote.main(args) == 0
    resumed = checkpoint.load(run / "checkpoints" / "last.pt")
    assert resumed["step"] == STEPS
    assert all(torch_equal(straight["ema"][k], resumed["ema"][k]) for k in straight["ema"])


def torch_equal(a, b) -> bool:
    import torch
    return torch.equal(a, b)


def _wide_near_data(tmp_path: Path) -> Path:
    """The hand design with one encoder shared and decoders of 2x, 1x and 1/2 the width."""
    import dataclasses
    from meme.model.config import ShareConfig
    hand = TINY.reference
    e = dataclasses.replace(hand.experts[0], group_channels=8)
    experts = tuple(dataclasses.replace(e, decoder_channels=d * e.base_channels // 2) for d in (4, 2, 1))
    cfg = dataclasses.replace(hand, name="wide", experts=experts, expert_probs=(), boundaries=(0, 200, 425, 1000),
                              share=ShareConfig(encoder_stages=2, mid=True))
    return cfg.validate().save(tmp_path / "wide.yaml")


def test_crossover_study_scores_every_budget_at_equal_compute(tiny_study):
    out = tiny_study / "crossover"
    assert compare.main(["--study", str(tiny_study), "--seeds", "2", "--budgets", "3,6", "--init", "scratch,branch",
                         "--designs", "single,hand,hand+branch", "--jobs", "2", "--tolerance", "10",
                         "--fid-budgets", "largest", "--out", str(out)]) == 0
    stages = [ln.split(" -m ")[1].split()[0] for ln in
              (out / "steps6" / "hand" / "seed1" / "promote.log").read_text().splitlines() if ln.startswith("$ ")]
    assert stages == ["meme.training.train", "meme.sampling.heldout", "meme.sampling.sample", "meme.sampling.evaluate"]   # the cheap numbers first
    rec = json.loads((out / "crossover.json").read_text())
    runs = pd.DataFrame(rec["runs"])
    assert len(runs) == 12 and sorted(set(runs.budget_steps)) == [3, 6]
    assert set(runs.design) == {"single", "hand", "hand+branch"}
    for steps in (3, 6):
        at = runs[runs.budget_steps == steps].groupby("design").charged_tflops.first()
        assert at["hand+branch"] == pytest.approx(at["hand"], rel=1e-6)   # the parent phase is inside the budget
        assert all(len(b) == 4 for b in runs[runs.budget_steps == steps].heldout_bins)
    # budget 3 of a from-scratch design is the budget-6 run's snapshot; a branched one is its own run
    derived = out / "steps3" / "hand" / "seed1"
    assert "prefix of" in (derived / "train.done").read_text()
    branched = json.loads((out / "steps3" / "hand+branch" / "seed1" / "options.json").read_text())
    assert branched["steps"] == 3 and branched["branch_at"] == 0.5
    table = pd.DataFrame(rec["summary"])
    assert len(table) == 6 and (table.seeds == 2).all()
    assert set(rec["crossover"]["fid"]) == set(rec["crossover"]["heldout"]) == {"hand", "hand+branch"}
    assert table[table.budget_steps == 6].fid_mean.notna().all() and table[table.budget_steps == 3].fid_mean.isna().all()
    assert (table[(table.budget_steps == 3) & (table.design != "single")].fid_verdict == "not measured").all()
    assert not (out / "steps3" / "hand" / "seed1" / "samples").exists()       # no FID asked for there
    assert (out / "crossover.png").is_file() and "Beats single from" in (out / "crossover.md").read_text()
    _resumes_from_the_committed_rows(tiny_study, out, runs)


def test_an_added_design_of_unequal_experts_trains_weighted(tiny_study, tmp_path):
    """``--add-design TAG=YAML``: decoders of 2x, 1x and 1/2 the width differ in cost, so the
    row trains with the weighted schedule (one design, one budget: the mechanics, not a study)."""
    added = tiny_study / "crossover-added"
    assert compare.main(["--study", str(tiny_study), "--seeds", "2", "--budgets", "6", "--init", "scratch",
                         "--add-design", f"wide={_wide_near_data(tmp_path)}", "--designs", "wide",
                         "--jobs", "2", "--tolerance", "10", "--fid-budgets", "none", "--out", str(added)]) == 0
    opts = json.loads((added / "steps6" / "wide" / "seed1" / "options.json").read_text())
    assert opts["schedule"] == "weighted"
    assert "weighted" in json.loads((added / "crossover.json").read_text())["runs"][-1]["role"]
    from nas.studies import crossover
    assert crossover.branchable(MemeConfig.load(tmp_path / "wide.yaml"))     # the widest decoder is the parent's


def _resumes_from_the_committed_rows(tiny_study, out: Path, before: pd.DataFrame):
    """A clone has crossover_runs.csv but no run folders: finished rows stand, only the missing FID is run."""
    import shutil
    for steps in (3, 6):
        shutil.rmtree(out / f"steps{steps}" / "hand")
    every = pd.read_csv(out / "crossover_runs.csv")
    lost = (every.design == "hand") & (every.seed == 2) & (every.budget_steps == 6)
    every.loc[lost, "fid"] = None                   # an FID pass stopped before this run
    every.to_csv(out / "crossover_runs.csv", index=False)
    assert compare.main(["--study", str(tiny_study), "--seeds", "2", "--budgets", "3,6", "--init", "scratch,branch",
                         "--designs", "single,hand,hand+branch", "--jobs", "2", "--tolerance", "10",
                         "--fid-budgets", "largest", "--out", str(out)]) == 0
    assert not (out / "steps6" / "hand" / "seed1").exists() and not (out / "steps3" / "hand").exists()
    assert (out / "steps6" / "hand" / "seed2" / "eval.json").is_file()      # retrained and scored: FID was missing
    after = pd.DataFrame(json.loads((out / "crossover.json").read_text())["runs"])
    key = ["design", "seed", "budget_steps"]
    merged = before.merge(after, on=key, suffixes=("", "_now"))
    assert len(merged) == len(before) == 12
    assert merged.heldout_loss.tolist() == pytest.approx(merged.heldout_loss_now.tolist(), rel=1e-6)
    assert merged.fid_now.notna().sum() == merged.fid.notna().sum()


def test_equal_compute_check_charges_an_outside_source_in_full(tmp_path):
    from nas.promote.promote import PromoteProtocol
    from nas.space.space import PromoteRecipe
    from nas.studies import crossover
    hand = TINY.reference
    (tmp_path / "supernet.json").write_text(json.dumps({"train_gflops_total": 5000.0}))
    proto = PromoteProtocol(data="fashion-mnist", recipe=PromoteRecipe(steps=6, batch_size=8, init_from=str(tmp_path)))
    designs = [Design("hand", hand, init="scratch"), Design("hand+branch", hand, init="branch")]
    with pytest.raises(UserError, match="not at equal training compute"):
        crossover.check_equal_compute(designs, proto, [6], 0.05)
    ok = crossover.check_equal_compute(designs, dataclasses_replace(proto, init_from=None), [6], 0.05)
    assert ok[("hand+branch", 6)].charged_tflops == pytest.approx(ok[("hand", 6)].charged_tflops)
    assert ok[("hand+branch", 6)].parent_phase_tflops > 0


def test_a_multistage_design_is_at_equal_compute_only_when_trained_weighted():
    """Decoders of 32, 16 and 4 channels: the interval-weighted per-step cost is the single
    network's; trained interleaved (each expert a third of the steps) it would spend far more."""
    from meme.model.references import resolve
    from nas.promote.promote import PromoteProtocol
    from nas.space.space import PromoteRecipe
    from nas.studies import crossover
    proto = PromoteProtocol(data="fashion-mnist", recipe=PromoteRecipe(steps=2000, batch_size=32))
    single = Design("hand", MemeConfig.from_dict({**resolve("fmnist16-meme-small").to_dict(), "name": "single",
                                                 "experts": [resolve("fmnist16-meme-small").to_dict()["experts"][1]],
                                                 "expert_probs": []}))
    [ms] = compare.added_designs(["multistage=multistage-fmnist16"])
    assert ms.schedule == "weighted" and "--schedule weighted" in ms.info["role"]
    done = crossover.check_equal_compute([single, ms], proto, [2000], 0.01)
    assert done[("multistage", 2000)].charged_tflops == pytest.approx(done[("hand", 2000)].charged_tflops, rel=0.01)
    import dataclasses
    with pytest.raises(UserError, match="not at equal training compute"):
        crossover.check_equal_compute([single, dataclasses.replace(ms, schedule="interleaved")], proto, [2000], 0.05)
    with pytest.raises(UserError, match="write TAG=CONFIG"):
        compare.added_designs(["multistage-fmnist16"])


def dataclasses_replace(proto, **recipe_changes):
    import dataclasses
    return dataclasses.replace(proto, recipe=dataclasses.replace(proto.recipe, **recipe_changes))


def test_the_search_winner_is_the_re_rank_winner_wherever_it_ranked(tiny_study, tmp_path):
    """A re-rank can crown a trial the single-seed search ranked last; compare trains that one."""
    study_dir = tmp_path / "s"
    shutil.copytree(tiny_study, study_dir, ignore=shutil.ignore_patterns("promoted", "compare*"))
    study = open_study(study_dir)
    order = [t.number for t in ranked(study)]
    assert len(order) >= 2
    last = order[-1]
    (study_dir / "rerank.json").write_text(json.dumps({"designs": [
        {"name": f"trial {order[0]}", "mean": 0.2, "n": 2}, {"name": f"trial {last}", "mean": 0.1, "n": 2},
        {"name": "reference", "mean": 0.05, "n": 2}]}))
    designs = compare.search_designs(study_dir, study, top=2)
    assert [d.info["trial"] for d in designs] == [last, order[0]]
    assert designs[0].tag == "search" and designs[0].info["role"] == f"search trial #{last}"
    (study_dir / "rerank.json").unlink()   # no re-rank: the search's own best
    assert [d.info["trial"] for d in compare.search_designs(study_dir, study, top=1)] == [order[0]]
    # a study run before picks its own winner; --search-trial names it, and a mismatch is refused
    assert [d.info["trial"] for d in compare.search_designs(study_dir, study, top=1, trial=last)] == [last]
    with pytest.raises(UserError, match="--search-trial 999: not a finished trial"):
        compare.search_designs(study_dir, study, top=1, trial=999)
    from nas.studies import crossover
    from nas.promote.promote import PromoteProtocol
    from nas.space.space import PromoteRecipe
    [winner] = compare.search_designs(study_dir, study, top=1, trial=last)
    proto = PromoteProtocol(data="fashion-mnist", recipe=PromoteRecipe(steps=6), fid=False)
    recorded = {("search", 1, 6): {"heldout_loss": 0.1, "trial": float(order[0])}}
    with pytest.raises(UserError, match=rf"recorded search rows are search trial #{order[0]}.*--search-trial {order[0]}"):
        crossover.from_record((winner, 1, tmp_path / "steps6", proto, 6), recorded)
    recorded[("search", 1, 6)]["trial"] = float(last)
    assert crossover.from_record((winner, 1, tmp_path / "steps6", proto, 6), recorded)["heldout_loss"] == 0.1
