"""nas.bench.run: a quick CPU run yields a complete table, CSV and markdown section (never timings)."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from meme.speed import bench_report, model_bench
from meme.speed import forward_bench as bench_forward
from nas.bench import run as bench
from nas.evaluators.device_share import usable_cores

REPO = Path(__file__).resolve().parents[3]


def expected_keys() -> set[tuple[str, str, str]]:
    """(section, item, metric) of every row a CPU run of all sections must print."""
    keys = {("device", "*", "matmul_peak_float32")}
    variants = [v.name for v in bench_forward.fast_path_variants(compile=False)]
    for m in bench_forward.FAST_PATH_MODELS + (bench.PROXY_ITEM,):
        keys |= {("fastpath", m, f"ms_{v}") for v in variants}
    keys |= {("fastpath", "/".join(bench_forward.FAST_PATH_MODELS), f"speed_ratio_{v}") for v in variants}
    for m in model_bench.SAMPLING_MODELS:
        keys |= {("sampling", m, k) for k in ("img_per_s", "ms_per_step", "latency_per_img")}
    for m in model_bench.TRAINING_MODELS:
        keys |= {("training", m, k) for k in ("step_time", "img_per_s", "model_tflops_per_s", "mfu")}
    keys |= {("memory", "meme-table4", k) for k in
             ("peak_device_mem_normal", "peak_device_mem_low_memory", "low_memory_saving")}
    keys |= {("search", "macs_check", k) for k in ("s_per_candidate_cold", "s_per_candidate", "by_parts_speedup")}
    keys |= {("search", "engine_optuna", k) for k in
             ("wall_per_trial", "body_per_trial", "overhead_s_per_trial", "overhead")}
    keys |= {("search", "engine_ray", "overhead")}
    if usable_cores() >= 2:     # one trial at a time against one per core
        keys |= {("search", "trials_at_once_1", "candidates_per_min"),
                 ("search", f"trials_at_once_{usable_cores()}", "candidates_per_min")}
    keys |= {("search", "evaluator_scratch", "s_per_candidate"), ("search", "evaluator_supernet", "speedup_cold"),
             ("search", "evaluator_supernet", "s_per_candidate_cold"), ("search", "evaluator_supernet",
                                                                        "s_per_candidate_warm"),
             ("search", "evaluator_supernet", "one_time_train_gflops_per_step"),
             ("target", "supernet evaluator", "speedup_per_candidate"),
             ("search", "supernet_search_optuna", "distinct_per_min"),
             ("target", "supernet search (default engine)", "distinct_in_420s")}
    e = "meme-table4 expert 1"
    keys |= {("iformer", e, k) for k in ("ms_fast_mixer", "ms_reference_mixer", "macs_share", "time_share_fast",
                                         "time_share_reference")}
    keys |= {("iformer", f"{e}/ldm-l", k) for k in ("speed_ratio_fast", "speed_ratio_reference")}
    keys |= {("iformer", e, k) for k in ("ms_b4", "ms_b4_without_iformer_blocks", "iformer_blocks_ms_b4",
                                         "iformer_blocks_ms_b4_for_3.2x")}
    keys |= {("iformer", f"{e}/ldm-l", "speed_ratio_b4"),
             ("iformer", f"{e} without iFormer blocks/ldm-l", "macs_rate_ratio_b4")}
    keys |= {("target", "iFormer blocks", "time_share/macs_share (cpu)"),
             ("target", "iFormer blocks", "time_share/macs_share at the sampling batch (cpu)")}
    keys |= {("target", "meme-table4/ldm-l sampling", "img_per_s_ratio (cpu)"),
             ("target", "meme-table4/ldm-l sampling", "img_per_s_ratio (H100/H200)"),
             ("target", "iU-Net expert training", "mfu (cpu)"),
             ("target", "iU-Net expert training", "mfu (H100/H200 bf16)"),
             ("target", "MACs check", "s_per_candidate"),
             ("target", "engine overhead (optuna)", "pct_of_trial"),
             ("target", "engine overhead (ray)", "pct_of_trial")}
    return keys


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick CPU run of every section (Ray left out: its start-up alone is many seconds)."""
    out = tmp_path_factory.mktemp("bench")
    md = out / "BENCHMARKS.md"
    proc = subprocess.run(
        [sys.executable, "-m", "nas.bench.run", "--device", "cpu", "--quick", "--resolution", "16",
         "--repeats", "1", "--warmup", "0", "--engines", "optuna", "--out", str(out), "--md", str(md)],
        cwd=REPO, capture_output=True, text=True, timeout=540)  # bounded; a loaded 2-core box needs the room
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, out, md


def test_quick_run_writes_every_row_and_column(quick_run):
    proc, out, md = quick_run
    csvs = list(out.glob("bench-cpu-quick-*.csv"))
    assert len(csvs) == 1
    with csvs[0].open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == bench_report.COLUMNS
        rows = list(reader)
    got = {(r["section"], "*" if r["section"] == "device" else r["item"], r["metric"]) for r in rows}
    assert expected_keys() <= got
    for r in rows:
        assert r["value"] != "", r
    by = {(r["section"], r["item"], r["metric"]): r for r in rows}
    # No GPU here: device memory is labelled, GPU targets stay unmeasured, Ray was not asked for.
    assert by[("memory", "meme-table4", "peak_device_mem_normal")]["value"] == "n/a (cpu)"
    assert by[("target", "iU-Net expert training", "mfu (H100/H200 bf16)")]["value"] == bench_report.NOT_MEASURED
    assert by[("search", "engine_ray", "overhead")]["value"] == "skipped (--engines)"
    if usable_cores() >= 2:     # the several-at-once row's vs_ref is its rate over the one-at-a-time rate
        one = float(by[("search", "trials_at_once_1", "candidates_per_min")]["value"])
        more = by[("search", f"trials_at_once_{usable_cores()}", "candidates_per_min")]
        assert float(more["vs_ref"]) == pytest.approx(float(more["value"]) / one, rel=0.02)
    scratch = float(by[("search", "evaluator_scratch", "s_per_candidate")]["value"])
    cold = float(by[("search", "evaluator_supernet", "s_per_candidate_cold")]["value"])
    # the CSV keeps three significant digits: the ratio of printed values agrees to ~1%
    assert float(by[("search", "evaluator_supernet", "speedup_cold")]["value"]) == pytest.approx(scratch / cold, rel=0.02)
    # Ratios are recomputed from the rows' own values: a speed-up is ref time / this time,
    # an img/s ratio is this / ref, and the MACs ratio is the reference's MACs over this model's.
    for m in bench_forward.FAST_PATH_MODELS:
        fp32 = float(by[("fastpath", m, "ms_fp32")]["value"])
        for (sec, item, metric), r in by.items():
            if sec == "fastpath" and item == m and metric.startswith("ms_"):
                assert float(r["vs_ref"]) == pytest.approx(fp32 / float(r["value"]), rel=0.01, abs=0.006)  # the CSV rounds ratios to 2 decimals
    assert float(by[("search", "supernet_search_optuna", "distinct_per_min")]["value"]) > 0   # a search really ran
    share = by[("iformer", "meme-table4 expert 1", "time_share_fast")]
    macs_share = float(by[("iformer", "meme-table4 expert 1", "macs_share")]["value"])
    assert 0 < macs_share < 100 and 0 < float(share["value"]) < 100
    assert float(share["vs_ref"]) == pytest.approx(float(share["value"]) / macs_share, rel=0.01, abs=0.006)
    # the blocks' cost at the sampling batch is the expert's time minus its time without them
    e = "meme-table4 expert 1"
    with_ms, rest_ms = (float(by[("iformer", e, m)]["value"]) for m in ("ms_b4", "ms_b4_without_iformer_blocks"))
    blocks = by[("iformer", e, "iformer_blocks_ms_b4")]
    assert float(blocks["value"]) == pytest.approx(with_ms - rest_ms, rel=0.02, abs=0.02)
    assert float(blocks["vs_ref"]) == pytest.approx((with_ms - rest_ms) / with_ms / (macs_share / 100), rel=0.03, abs=0.01)
    ldm_ms = with_ms * float(by[("iformer", f"{e}/ldm-l", "speed_ratio_b4")]["value"])
    assert float(by[("iformer", e, "iformer_blocks_ms_b4_for_3.2x")]["value"]) == pytest.approx(
        ldm_ms / 3.2 - rest_ms, rel=0.05, abs=0.05)
    assert by[("target", "iFormer blocks", "time_share/macs_share at the sampling batch (cpu)")]["value"] \
        == blocks["vs_ref"]
    # each stage's mixer alone (4 stages of meme-table4), fast against reference, fp32 at b1 and the bench batch
    mixers = {(r["item"], r["metric"]): r for r in rows if r["section"] == "iformer" and " mixer " in r["item"]}
    assert len({item for item, _ in mixers}) == 4
    assert {m for _, m in mixers} >= {"ms_fast_mixer_fp32_b1", "ms_fast_mixer_fp32_b4"}
    for r in mixers.values():
        reference_ms = float(r["note"].split("reference ")[1].split(" ms")[0])
        assert float(r["vs_ref"]) == pytest.approx(reference_ms / float(r["value"]), rel=0.02, abs=0.006)
    ref = by[("sampling", "ldm-l", "img_per_s")]
    mine = by[("sampling", "meme-table4", "img_per_s")]
    assert float(mine["vs_ref"]) == pytest.approx(float(mine["value"]) / float(ref["value"]), rel=0.01, abs=0.006)  # the CSV rounds ratios to 2 decimals
    steps = by[("sampling", "meme-table4", "ms_per_step")]
    assert float(steps["vs_ref"]) == pytest.approx(float(by[("sampling", "ldm-l", "ms_per_step")]["value"])
                                                   / float(steps["value"]), rel=0.01, abs=0.006)  # the CSV rounds ratios to 2 decimals
    from meme.model.macs import cost_of_meme
    from meme.model.references import resolve
    macs = {n: sum(e.macs for e in cost_of_meme(resolve(n)).experts) / resolve(n).num_experts
            for n in ("ldm-l", "meme-table4")}
    assert float(mine["macs_ratio"]) == pytest.approx(macs["ldm-l"] / macs["meme-table4"], rel=0.05)
    assert "3x16x16 b4 4 steps" == by[("sampling", "meme-table4", "img_per_s")]["shape"]
    # The stdout table carries the same rows.
    for m in model_bench.SAMPLING_MODELS:
        assert m in proc.stdout
    assert "s_per_candidate" in proc.stdout and "not yet measured" in proc.stdout


def test_quick_run_markdown_section(quick_run):
    _, _, md = quick_run
    text = md.read_text()
    assert text.startswith("# Benchmarks")
    assert "-- quick mode" in text and "torch " in text and "command: `python -m nas.bench" in text
    assert "GPU (H100 / H200): not yet measured" in text


def test_markdown_rerun_replaces_only_its_device(tmp_path):
    md = tmp_path / "B.md"

    def write(key, sec):
        bench_report.update_markdown(md, key, sec, bench.MD_HEADER, bench.GPU_PENDING)

    row = [bench_report.Row("search", "macs_check", "s_per_candidate", 0.5, "s")]
    meta = {"device_type": "cpu", "device": "CPU X", "mode": "full", "date": "2024-01-01", "torch": "2",
            "threads": "2", "load": "0.0 0.0 0.0"}
    key, sec = bench.markdown_section(row, meta, "python -m nas.bench")
    write(key, sec)
    other = dict(meta, device="CPU Y")
    write(*bench.markdown_section(row, other, "python -m nas.bench"))
    key, sec = bench.markdown_section(row, dict(meta, date="2024-02-02"), "python -m nas.bench")
    write(key, sec)
    text = md.read_text()
    assert text.count("## CPU X") == 1 and "2024-02-02" in text and "2024-01-01" in text  # Y keeps its date
    assert text.count("## CPU Y") == 1 and text.count("not yet measured") >= 1
    gpu = dict(meta, device_type="cuda", device="NVIDIA H100")
    write(*bench.markdown_section(row, gpu, "python -m nas.bench"))
    text = md.read_text()
    assert "## NVIDIA H100" in text and "GPU (H100 / H200): not yet measured" not in text


def test_bad_section_is_one_line_error(capsys):
    assert bench.main(["--only", "sampling,nope", "--no-md"]) == 2
    assert "error: --only" in capsys.readouterr().err


def test_a_run_stopped_part_way_keeps_the_sections_it_finished(tmp_path):
    """SIGTERM while the second section runs: the CSV already holds every row of the first.

    (A lent GPU's time limit stops a run this way; the rows measured before it are kept.)"""
    import os
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "nas.bench.run", "--device", "cpu", "--quick", "--resolution", "16", "--repeats", "1",
         "--warmup", "0", "--only", "memory,search", "--engines", "optuna", "--out", str(tmp_path), "--no-md"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 300                    # bounded: the memory section takes seconds
        csvs: list[Path] = []
        while not csvs and proc.poll() is None and time.monotonic() < end:
            csvs = list(tmp_path.glob("bench-cpu-quick-memory-search-*.csv"))
            time.sleep(0.05)
        assert csvs, f"no CSV after the first section (rc {proc.poll()})"
        assert proc.poll() is None, "the run ended before it could be stopped part-way"
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    with csvs[0].open() as f:
        rows = list(csv.DictReader(f))
    got = {(r["section"], r["metric"]) for r in rows}
    assert {("memory", "peak_device_mem_normal"), ("memory", "low_memory_saving")} <= got
    assert not any(r["section"] in ("search", "target") for r in rows)    # search was cut off: none of its rows
