"""Config dataclasses: YAML round-trip, reference configs, and one-line errors for bad input."""
from __future__ import annotations

import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

from meme.model.config import ConfigError, MemeConfig, head_step_grid
from meme.model.references import reference_names, resolve

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("name", reference_names())
def test_yaml_round_trip_is_exact(name, tmp_path):
    cfg = resolve(name)
    assert MemeConfig.from_yaml(cfg.to_yaml()) == cfg
    assert MemeConfig.load(cfg.save(tmp_path / "c.yaml")) == cfg
    assert resolve(tmp_path / "c.yaml").hash() == cfg.hash()


def test_reference_configs_match_paper_tables():
    table4 = resolve("meme-table4")
    assert [e.high_ratios for e in table4.experts] == [
        ("3/4", "5/8", "1/2", "1/4"), ("3/4", "1/2", "3/8", "1/8"),
        ("3/4", "3/8", "1/4", "1/16"), ("3/4", "1/4", "1/8", "1/16")]
    assert table4.resolved_probs() == [0.8, 0.4, 0.2, 0.1]
    assert table4.intervals() == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    # d_h = 3/4 of 128 = 96, d_l = 32 = two 16-channel heads; stage 4 of expert 4: d_h = 32, d_l = 480 = 30 heads
    assert table4.experts[0].high_channels()[0] == 96 and table4.experts[3].high_channels()[3] == 32
    assert resolve("ldm-l").experts[0].base_channels == 224 and resolve("ldm-s").experts[0].base_channels == 128
    me = resolve("multi-expert-s")
    assert me.num_experts == 4 and len(set(me.experts)) == 1


def test_head_step_grid_by_hand():
    # width 64, 16-channel heads: d_l in {64, 48, 32, 16} -> d_h/d in {0, 1/4, 1/2, 3/4}
    assert head_step_grid(64, 16) == [Fraction(0), Fraction(1, 4), Fraction(1, 2), Fraction(3, 4)]


def test_non_uniform_boundaries_and_weights():
    cfg = resolve("meme-table4")
    d = cfg.to_dict()
    d["boundaries"] = [0, 100, 300, 600, 1000]
    c = MemeConfig.from_dict(d)
    assert c.intervals()[1] == (100, 300) and c.interval_weights() == [0.1, 0.2, 0.3, 0.4]


def _bad(mutate) -> str:
    d = resolve("meme-table4").to_dict()
    mutate(d)
    with pytest.raises(ConfigError) as exc:
        MemeConfig.from_dict(d)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_validation_messages_name_the_field():
    assert "high_ratios[2]=1/5 is not a head step" in _bad(lambda d: d["experts"][0].__setitem__("high_ratios", ["3/4", "5/8", "1/5", "1/4"]))
    assert "strictly increasing" in _bad(lambda d: d.__setitem__("boundaries", [0, 500, 400, 750, 1000]))
    assert "N+1 = 5" in _bad(lambda d: d.__setitem__("boundaries", [0, 500, 1000]))
    assert "expert_probs must lie in [0, 1]" in _bad(lambda d: d.__setitem__("expert_probs", [1.2, 0.4, 0.2, 0.1]))
    assert "kind must be one of" in _bad(lambda d: d["experts"][1].__setitem__("kind", "vit"))
    assert "unknown field(s) ['colour']" in _bad(lambda d: d.__setitem__("colour", "red"))
    assert "schedule must be one of" in _bad(lambda d: d["diffusion"].__setitem__("schedule", "cosine"))


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_bad_input_gives_one_line_and_exit_2(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: x\nexperts: [\n")
    not_head_step = tmp_path / "ratio.yaml"
    d = resolve("iu-ldm-s").to_dict()
    d["experts"][0]["high_ratios"] = ["3/4", "5/8", "1/2", "1/5"]
    not_head_step.write_text(yaml.safe_dump(d))
    decreasing = tmp_path / "bounds.yaml"
    d = resolve("meme-table4").to_dict()
    d["boundaries"] = [0, 600, 500, 750, 1000]
    decreasing.write_text(yaml.safe_dump(d))
    cases = [
        (("meme.model.macs", "no-such-model"), "unknown config 'no-such-model'"),
        (("meme.model.macs", str(bad_yaml)), "malformed YAML"),
        (("meme.model.macs", str(not_head_step)), "is not a head step"),
        (("meme.model.macs", str(decreasing)), "strictly increasing"),
        (("meme.training.train", "--config", "fmnist-meme-small", "--data", str(tmp_path / "missing"), "--out",
          str(tmp_path / "run")), "data not found"),
    ]
    for args, expected in cases:
        r = _cli(*args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], (args, r.stderr)
