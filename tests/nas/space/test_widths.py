"""A decoder width per expert as a search dimension (``search.widths``): draws obey the rule,
encode inverts them, Multistage's shape is a point of the space, bad input is one line."""
from __future__ import annotations

import dataclasses
from fractions import Fraction

import optuna
import pytest

from meme.model.config import ConfigError, MemeConfig
from meme.model.references import resolve
from nas.engine.record import readable_attrs
from nas.space.budget import cheapest_config
from nas.space.draw import FixedTrial, build_config, encode
from nas.space.space import load_space

optuna.logging.set_verbosity(optuna.logging.WARNING)
SPACE = "fmnist16-widths"


def widths_of(cfg: MemeConfig) -> list[Fraction]:
    return [Fraction(e.decoder_stage_channels()[0], e.base_channels) for e in cfg.experts]


def uniform_bounds(space):
    """The space with uniform boundaries: a draw then needs no clustering run."""
    return dataclasses.replace(space, boundaries=dataclasses.replace(space.boundaries, mode="uniform"))


def test_random_draws_keep_decoders_wider_near_the_data_and_encode_inverts_them():
    space = uniform_bounds(load_space(SPACE))
    sampler = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(sampler=sampler)
    seen = set()
    for i in range(300):
        trial = study.ask()
        cfg = build_config(trial, space)
        w = widths_of(cfg)
        assert all(str(x) in space.widths.choices for x in w)
        assert all(a >= b for a, b in zip(w, w[1:])), f"wider_near_data broken: {w}"
        if cfg.share.any:   # the shared encoder is the base's, whatever the decoders
            assert len({(e.base_channels, e.high_ratios) for e in cfg.experts}) == 1
        seen.update(w)
        assert build_config(FixedTrial(encode(cfg, space)), space).hash() == cfg.hash()
        study.tell(trial, 0.0)
    assert seen == {Fraction(c) for c in space.widths.choices}   # every width is drawn


def test_free_widths_do_break_the_order():
    space = uniform_bounds(load_space(SPACE))
    space = dataclasses.replace(space, widths=dataclasses.replace(space.widths, monotone="free"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    broken = 0
    for _ in range(200):
        w = widths_of(build_config(study.ask(), space))
        broken += any(a < b for a, b in zip(w, w[1:]))
    assert broken > 20


def test_multistage_is_a_point_of_the_space_and_the_dashboard_shows_its_widths():
    space = uniform_bounds(load_space(SPACE))
    ms = dataclasses.replace(resolve("multistage-fmnist16"), boundaries=(),      # uniform intervals here,
                             expert_probs=(1.0,) * 3)                           # hard experts written out
    assert build_config(FixedTrial(encode(ms, space)), space, name=ms.name).hash() == ms.hash()
    assert readable_attrs(ms, 0)["decoder_channels"] == "32 16 4"
    narrowest_up = dataclasses.replace(ms, experts=ms.experts[::-1])               # widest near t = T
    with pytest.raises(ConfigError, match=r"expert 2's decoder width 1 not in \['1/4'\]"):
        encode(narrowest_up, space)
    plain = resolve("fmnist16-meme-small")
    with pytest.raises(ConfigError, match="expert 1's group_channels differ from the space's target.expert"):
        encode(plain, space)   # fmnist16's hand design has LDM's groups, this space per-channel ones


def test_the_cheapest_candidate_has_the_narrowest_decoders():
    space = load_space(SPACE)
    cfg, gflops = cheapest_config(space)
    assert widths_of(cfg) == [Fraction(1, 4)] * cfg.num_experts
    plain, plain_gflops = cheapest_config(load_space("fmnist16"))
    assert gflops < 0.6 * plain_gflops


def test_bad_width_rules_are_one_line(tmp_path):
    text = (load_space(SPACE).source and open(load_space(SPACE).source).read())

    def space_with(old: str, new: str):
        p = tmp_path / "s.yaml"
        p.write_text(text.replace(old, new))
        return load_space(p)

    with pytest.raises(ConfigError, match=r"search.widths: 1/3 of base 16 is not a whole number of channels"):
        space_with("choices: [1/4, 1/2, 1, 3/2, 2]", "choices: [1/3, 1]")
    with pytest.raises(ConfigError, match=r"search.widths.monotone must be one of \['wider_near_data', 'free'\]"):
        space_with("monotone: wider_near_data", "monotone: narrower")
    with pytest.raises(ConfigError, match=r"search.widths: unknown field"):
        space_with("    monotone: wider_near_data", "    monotone: free\n    step: 2")
    with pytest.raises(ConfigError, match="supernet evaluator does not slice"):
        space_with("  seed: 0\n", "  seed: 0\n  evaluator: supernet\n")
