"""How many proxy trials one GPU runs at once: the rule against hand computation, and the
measurement's CPU answer (the GPU measurement runs in ``tests/meme/speed/test_cuda.py``)."""
from __future__ import annotations

from fractions import Fraction

import pytest

from meme.model.config import MemeConfig
from meme.model.macs import cost_of_meme
from nas.evaluators.device_share import (MAX_TRIALS, DeviceShare, measure_share, share_for_search, trial_cores,
                                          trials_at_once, usable_cores)
from nas.space.proxy import proxy_config
from nas.space.space import largest_candidate, load_space


@pytest.mark.parametrize("peak,free,busy,cores,want,limit", [
    # memory: floor(0.8 x 80000 / (20000 + 500)) = 3
    (20000, 80000, 0.05, 16, 3, "memory"),
    # time: ceil(1 / 0.3) = 4; memory floor(64000 / 1500) = 42
    (1000, 80000, 0.3, 16, 4, "time"),
    # cores: 2 host processes at most
    (1000, 80000, 0.05, 2, 2, "cores"),
    # every limit above 8: the cap
    (1000, 80000, 0.05, 16, MAX_TRIALS, "cap"),
    # a trial that does not fit twice still runs, alone
    (70000, 80000, 0.01, 16, 1, "memory"),
])
def test_trials_at_once_is_the_smallest_limit(peak, free, busy, cores, want, limit):
    share = trials_at_once(peak, free, busy, cores)
    assert (share.trials, share.limit) == (want, limit)
    assert f"{want} trials at once" in share.describe() and limit in share.describe()


def test_a_cpu_runs_one_trial_at_a_time_without_measuring():
    assert measure_share(load_space("tiny"), "cpu") == DeviceShare(1)


def test_largest_candidate_costs_at_least_every_macro_of_the_space():
    space = load_space("fmnist16-widths")
    big = largest_candidate(space)
    assert big.num_experts == max(space.num_experts)
    assert big.experts[0].decoder_channels == Fraction(space.widths.choices[-1]) * big.experts[0].base_channels
    cost = cost_of_meme(proxy_config(big, space.proxy)).gmacs_mean
    for base, blocks, pools in space.macro.combos():
        arch = space.arch(base, blocks, pools, ("0",) * space.num_stages)
        one = cost_of_meme(proxy_config(MemeConfig(name="x", experts=(arch,), data=space.data,
                                                      diffusion=space.diffusion).validate(), space.proxy)).gmacs_mean
        assert one <= cost


def test_a_search_that_samples_at_every_rung_runs_one_trial_at_a_time_unmeasured():
    """The measured share covers the held-out loss only: an FID search is not given it."""
    share = share_for_search(load_space("tiny"), "cpu", "fid")
    assert (share.trials, share.limit) == (1, "objective")
    assert "--trials-at-once" in share.describe()
    assert share_for_search(load_space("tiny"), "cpu", "loss") == DeviceShare(1)


def test_the_cores_limit_counts_trials_of_cpus_per_trial_cores():
    cores = usable_cores()
    assert trial_cores(1) == cores
    assert trial_cores(cores) == 1
    assert trial_cores(2) == max(1, cores // 2)
    assert trial_cores(1.5) == max(1, cores // 2)  # a trial of 1.5 cores holds two
