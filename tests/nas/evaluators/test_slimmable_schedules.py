"""A slimmable supernet trained on a tiny space, and schedules of its widths sampled, priced and refused."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy import stats as sps

from meme.common.errors import UserError
from meme.model.config import ConfigError
from meme.model.diffusion import Diffusion
from meme.model.experts import build_denoiser
from meme.model.macs import cost_of_meme, cost_of_network
from meme.model.references import resolve
from meme.model.schedule import Choice, Schedule, load_schedule, schedule_denoiser
from meme.model.supernet import SupernetSpec
from meme.sampling import sample as sample_cli
from meme.sampling.sample import SamplingPlan, generate
from meme.training.options import TrainOptions
from meme.training.train import Trainer, train, training_compute
from nas.evaluators.supernet_training import auto_group_channels, parse_widths, train_all
from nas.studies.slimmable import standalone_by_width
from nas.studies import slimmable
from tests.tiny_models import single_thread, tiny_space_variant

WIDTHS = ("1/2", "1")


def tiny_slim_space(folder: Path) -> Path:
    """search_spaces/tiny.yaml at base 32 with d_h/d = 1/2: at the proxy's x1/2, stages of 16 and 32
    channels (8 and 16 at width 1/2) in 4-channel heads, whole heads at both widths."""
    def edit(d):
        d["search"]["ratios"].update(min="1/2", max="1/2")
        d["search"]["macro"]["base_channels"] = [32]      # proxy x1/2: 16 at full width, 8 at 1/2
    return tiny_space_variant(folder, "tiny-slim", edit)


@pytest.fixture(scope="module")
def slim(tmp_path_factory):
    with single_thread():
        folder = tmp_path_factory.mktemp("slim")
        space = tiny_slim_space(folder)
        out = folder / "sn"
        train_all(str(space), out, 3, jobs=1, progress=False, widths=WIDTHS, distill=True, ema_decay=0.9)
        yield space, out


def write_schedule(folder: Path, supernet: Path, widths=("1", "1/2"), bounds=(0, 400, 1000)) -> Path:
    return Schedule(tuple(bounds), tuple(Choice(w) for w in widths), str(supernet), "s").save(folder / "s.yaml")


def test_the_index_records_what_a_schedule_needs(slim):
    _, out = slim
    entry = json.loads((out / "supernet.json").read_text())["macros"]["b32-r1"]
    assert entry["widths"] == list(WIDTHS) and entry["distill"] is True and entry["ema_decay"] == 0.9
    assert entry["diffusion"]["schedule"] == "sqrt_linear"                     # tiny's, not the default
    assert entry["spec"]["template"]["group_channels"] == auto_group_channels(16, WIDTHS) == 8   # gcd(8, 16)
    rows = list(csv.DictReader(open(out / "b32-r1" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    ckpt = torch.load(out / "b32-r1" / "checkpoint.pt", weights_only=True)
    written = torch.load(out / "b32-r1" / "supernet.pt", weights_only=True)
    assert ckpt["ema_n"] == 3 and all(torch.equal(written[k], v) for k, v in ckpt["ema"].items())   # the EMA is sampled
    assert any(not torch.equal(written[k], v) for k, v in ckpt["model"].items())


def test_a_schedule_sampled_from_the_supernet_equals_its_extracted_networks_sampled_as_a_meme(slim, tmp_path):
    _, out = slim
    path = write_schedule(tmp_path, out)
    schedule, trained, cfg = load_schedule(path)
    assert [a.base_channels for a in cfg.experts] == [16, 8] and cfg.boundaries == (0, 400, 1000)
    plan = SamplingPlan(n=3, steps=4, eta=0.0, sampler="ddim", seed=7, batch_size=3)
    diffusion = Diffusion(cfg.diffusion)
    shape = (1, 16, 16)
    views = generate(schedule_denoiser(schedule, trained.weights(), extract=False), diffusion, shape, plan, precision="fp32")
    net = trained.weights()
    meme = build_denoiser(cfg)                                     # the schedule as a plain MEME
    for e, arch in zip(meme.experts, cfg.experts):
        e.load_state_dict(net.extract(arch).state_dict())
    plain = generate(meme, diffusion, shape, plan, precision="fp32")
    assert views.abs().max() > 0.05
    assert torch.allclose(views, plain, atol=1e-4, rtol=0), (views - plain).abs().max()
    # the full-width schedule is another function of the same weights
    full = Schedule.uniform("1", 1000, str(out))
    other = generate(schedule_denoiser(full, trained.weights(), extract=True), diffusion, shape, plan, precision="fp32")
    assert (other - plain).abs().max() > 1e-3


def test_a_schedule_is_priced_per_interval(slim, tmp_path):
    _, out = slim
    path = write_schedule(tmp_path, out)
    cfg = resolve(str(path))                                       # meme-nas macs / latency accept it as a config
    wide, narrow = (cost_of_network(a, cfg.data).gflops for a in cfg.experts)
    assert cost_of_meme(cfg).gflops_mean == pytest.approx(0.4 * wide + 0.6 * narrow, rel=1e-9)
    assert narrow < 0.4 * wide


def test_the_sample_command_writes_a_schedule_s_images(slim, tmp_path):
    _, out = slim
    path = write_schedule(tmp_path, out)
    assert sample_cli.main(["--schedule", str(path), "--n", "2", "--steps", "2", "--device", "cpu",
                            "--precision", "fp32"]) == 0
    info = json.loads((tmp_path / "s-samples" / "sampling.json").read_text())
    assert info["n"] == 2 and "widths 1, 1/2" in info["source"]


def test_what_is_refused_in_one_line(slim, tmp_path):
    _, out = slim
    with pytest.raises(ConfigError, match=r"width 1/4 .* is not one of the supernet's \['1/2', '1'\]"):
        load_schedule(write_schedule(tmp_path, out, widths=("1", "1/4")))
    with pytest.raises(ConfigError, match="2 experts need 3 boundaries"):
        load_schedule(write_schedule(tmp_path, out, bounds=(0, 1000)))
    (tmp_path / "bare.yaml").write_text(yaml.safe_dump({"boundaries": [0, 1000], "experts": [{"width": 1}]}))
    with pytest.raises(UserError, match="names no supernet"):
        load_schedule(tmp_path / "bare.yaml")
    with pytest.raises(UserError, match="--widths must lie in"):
        parse_widths("0,1/2")
    assert parse_widths("1/2,1/4") == ("1/4", "1/2", "1")


def test_front_writes_the_best_schedule_under_a_budget(slim, tmp_path):
    _, out = slim
    full = cost_of_meme(load_schedule(write_schedule(tmp_path, out, widths=("1",), bounds=(0, 1000)))[2]).gflops_mean
    budget = 0.6 * full                         # between the half width (~0.27x) and the full one
    assert slimmable.main(["front", "--supernet", str(out), "--bins", "4", "--per-bin", "1", "--device", "cpu",
                           "--budget-gflops", str(budget), "--out", str(tmp_path / "front")]) == 0
    schedule, _, cfg = load_schedule(tmp_path / "front" / "best.yaml")
    assert cost_of_meme(cfg).gflops_mean <= budget * (1 + 1e-9)
    front = json.loads((tmp_path / "front" / "front.json").read_text())
    costs = [p["gflops"] for p in front["front"]]
    losses = [p["loss"] for p in front["front"]]
    assert costs == sorted(costs) and losses == sorted(losses, reverse=True)   # a front: dearer is better


def test_the_study_pairs_schedules_by_noise_seed(slim, tmp_path):
    _, out = slim
    # the same supernet twice stands for two training seeds: the second gets the headline rows only
    assert slimmable.main(["study", "--supernets", f"{out},{out}", "--out", str(tmp_path / "st"), "--bins", "2",
                           "--per-bin", "1", "--match", "1/2,1", "--headline", "1/2", "--seeds", "0,1", "--n", "8",
                           "--n-ref", "32",
                           "--steps", "2", "--batch-size", "8", "--device", "cpu"]) == 0
    result = json.loads((tmp_path / "st" / "study.json").read_text())
    rows = {r["design"]: r for r in result["supernets"][0]["rows"]}
    assert {"uniform-1", "uniform-1/2", "searched@1/2", "reversed@1/2"} <= set(rows)
    half, full = rows["uniform-1/2"], rows["uniform-1"]
    diffs = [a - b for a, b in zip(half["fid"], full["fid"])]      # paired by seed, by hand
    assert half["vs_full"]["diff_mean"] == pytest.approx(sum(diffs) / 2)
    assert half["vs_full"]["diff_std"] == pytest.approx(abs(diffs[0] - diffs[1]) / 2 ** 0.5)
    assert half["gflops_ratio_vs_full"] < 0.5 and full["speedup_vs_full"] == pytest.approx(1.0)
    assert (tmp_path / "st" / "study.png").stat().st_size > 0 and "paired vs full" in (tmp_path / "st" / "study.md").read_text()
    second = {r["design"] for r in result["supernets"][1]["rows"]}
    assert second == {"uniform-1", "uniform-1/2", "searched@1/2"}
    assert [h["width"] for h in result["headline"]] == ["1/2"] and result["headline"][0]["searched_vs_full"]["n"] == 4
    sets = sorted(p.name for p in (tmp_path / "st" / "sets").iterdir())
    assert len(sets) == 2 * len({tuple(r["widths_per_bin"]) for r in rows.values()})   # one per schedule content and seed
    _a_standalone_network_is_scored_beside_its_width(slim[0], out, tmp_path, result)


def test_a_schedule_file_joins_the_study_paired_and_scored_on_the_fronts_protocol(slim, tmp_path):
    """``--schedules``: a schedule found elsewhere (its cut at t = 400, inside the study's first bin
    of [0, 500)) is sampled with the study's noise seeds and scored by the owner of each held-out t."""
    _, out = slim
    given = write_schedule(tmp_path, out)                     # width 1 on [0, 400), 1/2 on [400, 1000)
    assert slimmable.main(["study", "--supernets", str(out), "--out", str(tmp_path / "st"), "--bins", "2",
                           "--per-bin", "1", "--match", "1/2,1", "--seeds", "0,1", "--n", "8", "--n-ref", "32",
                           "--steps", "2", "--batch-size", "8", "--device", "cpu", "--schedules", str(given)]) == 0
    result = json.loads((tmp_path / "st" / "study.json").read_text())
    rows = {r["design"]: r for r in result["supernets"][0]["rows"]}
    mine, front = rows["file:s"], result["supernets"][0]["front"]
    assert mine["widths_per_bin"] == ["1", "1/2"]              # t = 250 and t = 750, one per bin
    w = front["widths"]
    assert mine["heldout_loss_sum"] == pytest.approx(front["losses"][w.index("1")][0] + front["losses"][w.index("1/2")][1])
    assert mine["gflops"] == pytest.approx(cost_of_meme(load_schedule(given)[2]).gflops_mean)
    near = rows[f"uniform-{mine['nearest_match']}"]
    diffs = [a - b for a, b in zip(mine["fid"], near["fid"])]
    assert mine["vs_uniform_same_cost"]["diff_mean"] == pytest.approx(sum(diffs) / 2)
    assert "vs_front_searched" in mine and "(schedule file)" in (tmp_path / "st" / "study.md").read_text()
    assert len([p for p in (tmp_path / "st" / "sets").iterdir() if "-schedule-" in p.name]) == 2
    assert list(slimmable.design_names([Path("a/schedule.yaml"), Path("b/schedule.yaml"), Path("c/x.yaml")])) == [
        "a-schedule", "b-schedule", "x"]


def _a_standalone_network_is_scored_beside_its_width(space: Path, out: Path, tmp_path: Path, before: dict) -> None:
    """A network of the width-1/2 architecture trained alone: sampled with the same noise seeds
    (the supernets' sets are reused, not resampled), set beside each supernet's uniform-1/2."""
    _, _, cfg = load_schedule(write_schedule(tmp_path, out, widths=("1/2",), bounds=(0, 1000)))
    np.save(tmp_path / "x.npy", np.random.default_rng(0).uniform(-1, 1, (16, 1, 16, 16)).astype(np.float32))
    opts = TrainOptions(data=str(tmp_path / "x.npy"), steps=2, batch_size=4, sample_every=0, device="cpu",
                        precision="fp32", ckpt_every=100)
    train(cfg, opts, tmp_path / "alone-half", progress=False)
    sets = set((tmp_path / "st" / "sets").iterdir())
    assert slimmable.main(["study", "--supernets", f"{out},{out}", "--out", str(tmp_path / "st"), "--bins", "2",
                           "--per-bin", "1", "--match", "1/2,1", "--headline", "1/2", "--seeds", "0,1", "--n", "8",
                           "--n-ref", "32", "--steps", "2", "--batch-size", "8", "--device", "cpu",
                           "--standalone", str(tmp_path / "alone-half")]) == 0
    assert set((tmp_path / "st" / "sets").iterdir()) - sets == {tmp_path / "st" / "sets" / f"standalone-alone-half-s{k}.json"
                                                                for k in (0, 1)}
    [row] = json.loads((tmp_path / "st" / "study.json").read_text())["standalone"]
    uniform = {r["design"]: r for r in before["supernets"][0]["rows"]}["uniform-1/2"]
    assert row["width"] == "1/2" and len(row["vs_supernets"]) == 2 and row["steps"] == 2
    diff = [a - b for a, b in zip(row["fid"], uniform["fid"])]
    assert row["vs_supernets"][0]["same_noise"]["diff_mean"] == pytest.approx(sum(diff) / 2)
    assert row["train_tflops"] == pytest.approx(json.loads((tmp_path / "alone-half" / "compute.json").read_text())
                                                ["charged_tflops"])
    assert "Stand-alone networks" in (tmp_path / "st" / "study.md").read_text()
    _a_run_trained_later_joins_the_finished_study(out, tmp_path, opts, cfg, row)
    _another_recipe_is_set_beside_the_study(space, out, tmp_path)
    two = load_schedule(write_schedule(tmp_path, out))[2]
    train(two, opts, tmp_path / "two", progress=False)
    with pytest.raises(UserError, match="a run of one network is compared with a uniform width"):
        slimmable.study([out], tmp_path / "st", bins=2, per_bin=1, match=["1/2"], seeds=[0], n=8, steps=2, batch=8,
                        n_ref=32, device=torch.device("cpu"), command="", standalone=[tmp_path / "two"])


def _a_run_trained_later_joins_the_finished_study(out: Path, tmp_path: Path, opts: TrainOptions, cfg, first: dict) -> None:
    """``slimmable standalone``: a second training seed joins with the study's own protocol, the
    supernets' weights no longer needed (their index copy beside the study gives the spec)."""
    import dataclasses, shutil
    train(cfg, dataclasses.replace(opts, seed=1), tmp_path / "alone-half-s1", progress=False)
    hidden = out.parent / (out.name + "-gone")
    out.rename(hidden)                        # the supernet's directory is gone ...
    try:
        with pytest.raises(UserError, match="not a trained supernet directory"):
            slimmable.add_standalone(tmp_path / "st", [tmp_path / "alone-half-s1"], torch.device("cpu"), "")
        (tmp_path / "st" / out.name).mkdir()  # ... its index copied beside the study is enough
        shutil.copy(hidden / "supernet.json", tmp_path / "st" / out.name / "supernet.json")
        assert slimmable.main(["standalone", "--study", str(tmp_path / "st"), "--runs",
                               str(tmp_path / "alone-half-s1"), "--device", "cpu"]) == 0
    finally:
        hidden.rename(out)
    result = json.loads((tmp_path / "st" / "study.json").read_text())
    kept, joined = result["standalone"]
    assert kept == first and joined["seed"] == 1 and len(joined["fid"]) == 2     # the study's seeds 0, 1
    assert (tmp_path / "st" / "sets" / "standalone-alone-half-s1-s1.json").is_file()
    [half] = result["standalone_by_width"]
    assert half["standalone"][2] == 2 and half["standalone"][0] == pytest.approx(
        (kept["fid_mean"] + joined["fid_mean"]) / 2)
    assert result["standalone_commands"][-1].endswith("--device cpu")
    with pytest.raises(UserError, match="no study.json"):
        slimmable.add_standalone(tmp_path / "nowhere", [tmp_path / "alone-half-s1"], torch.device("cpu"), "")


def _another_recipe_is_set_beside_the_study(space: Path, out: Path, tmp_path: Path) -> None:
    """``study --against``: design by design, this supernet's FID minus the other study's, per noise seed
    (here a supernet trained without distillation against the fixture's, trained with it)."""
    plain = tmp_path / "plain"
    train_all(str(space), plain, 3, jobs=1, progress=False, widths=WIDTHS, distill=False, ema_decay=0.9)
    args = ["study", "--supernets", str(plain), "--out", str(tmp_path / "st2"), "--bins", "2", "--per-bin", "1",
            "--match", "1/2,1", "--seeds", "0,1", "--n", "8", "--n-ref", "32", "--steps", "2", "--batch-size", "8",
            "--device", "cpu", "--against", str(tmp_path / "st")]
    with pytest.raises(UserError, match="not the same noise"):
        slimmable.study([plain], tmp_path / "st2", bins=2, per_bin=1, match=["1/2"], seeds=[0, 1], n=4, steps=2,
                        batch=8, n_ref=32, device=torch.device("cpu"), command="", against=tmp_path / "st")
    assert not (tmp_path / "st2").exists()            # refused before anything was sampled
    assert slimmable.main(args) == 0
    result = json.loads((tmp_path / "st2" / "study.json").read_text())
    theirs = {r["design"]: r for r in json.loads((tmp_path / "st" / "study.json").read_text())["supernets"][0]["rows"]}
    mine = {r["design"]: r for r in result["supernets"][0]["rows"]}
    row = {r["design"]: r for r in result["against"]["rows"]}["uniform-1/2"]
    diff = [a - b for a, b in zip(mine["uniform-1/2"]["fid"], theirs["uniform-1/2"]["fid"])]
    assert row["same_noise"]["diff_mean"] == pytest.approx(sum(diff) / 2) and diff[0] != 0
    assert (row["their_gflops"], row["their_fid_mean"]) == (theirs["uniform-1/2"]["gflops"],
                                                            theirs["uniform-1/2"]["fid_mean"])    # plotted beside
    assert len(result["against"]["their_full_width_over_training_seeds"]) == 2
    assert "## Against" in (tmp_path / "st2" / "study.md").read_text()


def test_train_init_from_cuts_a_schedule_s_experts_and_charges_the_supernet(slim, tmp_path):
    """``meme-nas train --config SCHEDULE --init-from SUPERNET``: each expert starts as its extracted
    sub-network, and the run's compute includes the supernet's training."""
    _, out = slim
    path = write_schedule(tmp_path, out)
    _, trained, cfg = load_schedule(path)
    net = trained.weights()
    opts = TrainOptions(data=str(tmp_path / "x.npy"), steps=1, batch_size=2, sample_every=0, device="cpu",
                        precision="fp32", init_from=str(out))
    np.save(tmp_path / "x.npy", np.zeros((4, 1, 16, 16), dtype=np.float32))
    tr = Trainer(cfg, opts, tmp_path / "run")
    for e, arch in zip(tr.model.experts, cfg.experts):
        want = net.extract(arch).state_dict()
        assert all(torch.equal(v, want[k]) for k, v in e.state_dict().items())
    assert tr.init_source == f"supernet {out}"
    index = json.loads((out / "supernet.json").read_text())
    compute = training_compute(cfg, opts, tr.branch)
    assert compute.source_tflops == pytest.approx(index["train_gflops_total"] / 1e3) and compute.source_tflops > 0


def test_standalone_runs_are_compared_with_the_supernets_over_training_seeds():
    """Per width: one FID per training on each side (runs of two seeds against two supernets,
    each supernet counted once however many runs name it), Welch's t against scipy's."""
    def run(width, fid, supernets):
        return {"width": width, "fid_mean": fid,
                "vs_supernets": [{"supernet": p, "supernet_fid_mean": f} for p, f in supernets]}

    both = [("s0", 106.0), ("s1", 101.0)]
    rows = [run("1", 90.0, both), run("1", 100.0, both), run("3/4", 87.0, [("s0", 117.0), ("s1", 113.0)])]
    by = {w["width"]: w for w in standalone_by_width(rows)}
    assert by["1"]["standalone"] == pytest.approx([95.0, 50 ** 0.5, 2])
    assert by["1"]["supernets"] == pytest.approx([103.5, 12.5 ** 0.5, 2])
    want = sps.ttest_ind([90.0, 100.0], [106.0, 101.0], equal_var=False)
    assert by["1"]["welch"]["diff"] == pytest.approx(-8.5)
    assert by["1"]["welch"]["p_value"] == pytest.approx(want.pvalue)
    assert by["3/4"]["standalone"][2] == 1 and by["3/4"]["welch"]["verdict"] == "cannot tell apart"


def test_distillation_on_own_batches_sees_the_plain_runs_batches_and_pays_for_its_teacher(slim, tmp_path):
    """Ten steps of each recipe from the same seed: ``--distill-batch own`` draws the very batches of the
    plain recipe (the full width's first loss is the plain one's), so only the students' target differs;
    its teacher forwards are charged; ``shared`` gives the students another batch than ``own``."""
    space, _ = slim

    def first_row(name, **kw):
        train_all(str(space), tmp_path / name, 10, jobs=1, progress=False, widths=WIDTHS, ema_decay=0.9, **kw)
        index = json.loads((tmp_path / name / "supernet.json").read_text())
        (entry,) = index["macros"].values()
        return next(csv.DictReader(open(tmp_path / name / entry["dir"] / "metrics.csv"))), entry, index

    plain, plain_entry, _ = first_row("plain")
    own, entry, index = first_row("own", distill=True, distill_batch="own")
    shared, _, _ = first_row("shared", distill=True)
    assert own["loss_most_conv"] == plain["loss_most_conv"] == shared["loss_most_conv"]
    # the students' target: the zero-initialised output of the teacher, not the noise
    assert float(own["loss_most_attention"]) == 0.0 < float(plain["loss_most_attention"])

    def draws(name):   # the generator after the steps: what it drew (sub-networks, batches, t, noise)
        return torch.load(tmp_path / name / entry["dir"] / "checkpoint.pt", weights_only=True)["generator"]
    assert torch.equal(draws("own"), draws("plain")) and not torch.equal(draws("own"), draws("shared"))
    spec = SupernetSpec.from_dict(entry["spec"])
    teacher = cost_of_network(spec.largest(), spec.data).gflops * entry["batch_size"]
    students = entry["subnets_per_step"] - 1
    assert entry["train_gflops"] == pytest.approx(plain_entry["train_gflops"] + 10 * students * teacher, abs=0.1)
    assert entry["distill_batch"] == "own" and "(own batches)" in index["rule"]
