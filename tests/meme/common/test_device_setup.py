"""One device set-up for every command (meme.common.fastpath): TF32 and cudnn.benchmark come
with any CUDA fast path, the user's own precision choice is kept, and --no-fast-path turns
everything off, in this process and in the processes it starts.

The CUDA flags are process-wide switches that need no GPU to set, so this runs on a CPU.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from meme.common.fastpath import FAST_PATH_ENV, FastPath, fast_path, set_up_cuda
from meme.model.config import ArchConfig, DataShape, DiffusionConfig, MemeConfig
from meme.sampling import sample
from meme.training import train
from nas.cli import COMMANDS

REPO = Path(__file__).resolve().parents[3]
# every command that runs a denoiser: (verb, sub-command or '')
RUNS_A_NETWORK = [("train", ""), ("sample", ""), ("latency", ""), ("latency-table", "table"),
                  ("latency-table", "report"), ("search", ""), ("rerank", ""), ("promote", ""), ("compare", ""),
                  ("fidelity", ""), ("supernet", "train"), ("interval-opt", ""), ("bench", "")]


@pytest.fixture(autouse=True)
def restore_torch_and_env(monkeypatch):
    """The switches are process-wide: put them back as they were."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision, torch.backends.cudnn.benchmark)
    monkeypatch.delenv(FAST_PATH_ENV, raising=False)
    matmul.fp32_precision, conv.fp32_precision = "none", "none"
    yield
    matmul.fp32_precision, conv.fp32_precision, torch.backends.cudnn.benchmark = before


def test_a_cuda_fast_path_sets_tf32_and_cudnn_benchmark():
    fp = fast_path(torch.device("cuda"), "auto")
    assert fp == FastPath("cuda", bf16=True, channels_last=True)
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    assert torch.backends.cudnn.benchmark is True


def test_a_precision_the_user_chose_is_kept():
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    settings = set_up_cuda()
    assert settings.matmul_fp32 == "ieee" and settings.cudnn_benchmark is True


def test_a_cpu_fast_path_leaves_the_cuda_switches_alone():
    torch.backends.cudnn.benchmark = False
    fast_path("cpu", "auto")
    assert torch.backends.cuda.matmul.fp32_precision == "none" and torch.backends.cudnn.benchmark is False


@pytest.mark.parametrize("verb,sub", RUNS_A_NETWORK, ids=lambda v: v or "-")
def test_every_command_that_runs_a_network_takes_no_fast_path(verb, sub, monkeypatch, capsys):
    """Parsing --no-fast-path switches the process (and what it starts, through the environment)."""
    main = __import__(COMMANDS[verb][0], fromlist=["main"]).main
    with pytest.raises(SystemExit):
        main([*([sub] if sub else []), "--help"])
    assert "--no-fast-path" in capsys.readouterr().out
    monkeypatch.delenv(FAST_PATH_ENV, raising=False)
    # a bad value after the flag stops parsing with exit 2, after the flag was seen
    try:
        rc = main([*([sub] if sub else []), "--no-fast-path", "--no-such-flag"])
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2
    capsys.readouterr()
    assert os.environ.get(FAST_PATH_ENV) == "0"


def test_no_fast_path_is_plain_fp32_everywhere(monkeypatch):
    monkeypatch.setenv(FAST_PATH_ENV, "0")
    assert fast_path("cpu", "bf16") == FastPath("cpu", bf16=False, channels_last=False)
    assert fast_path(torch.device("cuda"), "auto") == FastPath("cuda", bf16=False, channels_last=False)
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert torch.backends.cudnn.benchmark is False


def _tiny_cfg() -> MemeConfig:
    iunet = ArchConfig(kind="iunet", base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                       head_channels=8, high_ratios=("1/2", "1/4"), pool_strides=(2, 1))
    return MemeConfig(name="tiny", experts=(iunet,), data=DataShape(1, 16, False),
                      diffusion=DiffusionConfig.ddpm_pixels()).validate()


def test_train_and_sample_run_plain_under_no_fast_path(tmp_path, blobs, monkeypatch, caplog):
    """End to end on a CPU: the run's log and sampling.json say which path ran."""
    cfg_path = tmp_path / "tiny.yaml"
    _tiny_cfg().save(cfg_path)
    run = tmp_path / "run"
    common = ["--steps", "2", "--batch-size", "4", "--sample-every", "0", "--device", "cpu", "--threads", "1"]
    with caplog.at_level("INFO", logger="meme"):
        assert train.main(["--config", str(cfg_path), "--data", str(blobs), "--out", str(run), *common]) == 0
    assert re.search(r"\(fp32 \+ channels_last", caplog.text)
    assert sample.main(["--run", str(run), "--n", "2", "--steps", "2", "--device", "cpu",
                        "--out", str(tmp_path / "fast")]) == 0
    assert json.loads((tmp_path / "fast" / "sampling.json").read_text())["precision"] == "fp32 + channels_last"

    caplog.clear()
    with caplog.at_level("INFO", logger="meme"):
        assert train.main(["--config", str(cfg_path), "--data", str(blobs), "--out", str(tmp_path / "plain"),
                           "--no-fast-path", *common]) == 0
    assert re.search(r"\(fp32, ", caplog.text)
    assert sample.main(["--run", str(run), "--n", "2", "--steps", "2", "--device", "cpu", "--no-fast-path",
                        "--out", str(tmp_path / "slow")]) == 0
    assert json.loads((tmp_path / "slow" / "sampling.json").read_text())["precision"] == "fp32"
