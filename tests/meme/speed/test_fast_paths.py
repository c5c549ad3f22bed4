"""Fast paths (meme.common.fastpath): the choice per device, and that fast outputs match fp32.

Every comparison uses a woken tiny network (zero-init convs given random weights), so
each layer shapes the output; tolerances are those of bf16 (8 mantissa bits).
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from meme.common.fastpath import (CPU_BF16_MIN_WIDTH, DYNAMO_ROOM, FastPath, compile_budget, compile_for_inference,
                                   cpu_has_fast_bf16, fast_path)
from meme.model.blocks import (GELU, GroupNorm32, IFormerBlock, InceptionMixer, LowMixer, low_precision_group_norm,
                               max_pool3x3, reference_mixers)
from meme.model.config import ArchConfig, DataShape, MemeConfig
from meme.model.diffusion import Diffusion
from meme.model.experts import build_denoiser, build_network, wake_zero_init
from meme.sampling.sample import SamplingPlan, generate
from meme.speed.forward_bench import without_iformer_blocks
from meme.training.train import Trainer, TrainOptions

TINY = DataShape(channels=1, resolution=16, latent=False)
ARCHS = {
    "iunet": ArchConfig(kind="iunet", base_channels=32, channel_mult=(1, 2), num_res_blocks=1, head_channels=8,
                        high_ratios=("1/2", "1/4"), pool_strides=(2, 1)),
    "unet": ArchConfig(kind="unet", base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_ds=(2,),
                       head_channels=8),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def woken(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return wake_zero_init(build_network(ARCHS[kind], TINY), seed=1)


def batch(n: int = 4):
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 1000, (n,), generator=g)


# ---- the decision ----------------------------------------------------------------------

def test_forced_precisions_and_channels_last_everywhere():
    for dev in ("cpu", "cuda"):
        assert fast_path(dev, "fp32") == FastPath(dev, bf16=False, channels_last=True)
        assert fast_path(dev, "bf16") == FastPath(dev, bf16=True, channels_last=True)
    assert fast_path("cuda").bf16, "a GPU always runs bf16 under 'auto'"
    assert fast_path("cpu", "fp32").describe() == "fp32 + channels_last"
    with pytest.raises(ValueError, match="precision must be one of"):
        fast_path("cpu", "fp16")


def test_auto_on_cpu_depends_on_native_bf16_and_width():
    narrow = build_network(ARCHS["iunet"], TINY)            # 32 channels wide
    assert narrow.enc["16x16_conv"].conv.out_channels < CPU_BF16_MIN_WIDTH
    assert not fast_path("cpu", "auto", narrow).bf16, "narrow CPU networks lose with bf16: stay fp32"
    with torch.device("meta"):
        wide = build_network(dataclasses.replace(ARCHS["iunet"], base_channels=64, head_channels=16), TINY)
    assert fast_path("cpu", "auto", wide).bf16 == cpu_has_fast_bf16()


# ---- numbers -----------------------------------------------------------------------------

PAGE_FAULTS_PER_REALLOC = """
import resource, torch
from meme.common.fastpath import fast_path, reuse_freed_cpu_memory
fast_path("cpu")                                   # what every CPU run calls first
faults = []
for _ in range(24):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(16 << 20)                      # 64 MiB, touched, then freed
    x.fill_(1.0)
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(reuse_freed_cpu_memory(), sum(faults[12:]) / 12)   # the first few fill the heap's free lists
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_cpu_fast_path_reuses_freed_memory_instead_of_page_faulting():
    """A counted property, not a timing: once 64 MiB activations have been freed, the next
    one of that size takes its pages from the heap rather than faulting in fresh ones."""
    def run(setting: str) -> tuple[str, float]:
        env = {**os.environ, "MEME_CPU_MALLOC": setting}
        out = subprocess.run([sys.executable, "-c", PAGE_FAULTS_PER_REALLOC], env=env, check=True,
                             capture_output=True, text=True, timeout=120).stdout.split()
        return out[0], float(out[1])
    applied, tuned = run("")
    kept, system = run("system")
    assert (applied, kept) == ("True", "False")
    assert system > 0 and tuned * 4 < system, (tuned, system)


def test_groupnorm_mixed_dtype_cpu_path_equals_fp32_then_cast():
    """The CPU shortcut (bf16 in, fp32 affine) gives the numbers of casting to fp32 first,
    up to one rounding step of the output dtype (the kernel sums in another order)."""
    norm = GroupNorm32(64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = (torch.randn(3, 64, 8, 8, generator=g) * 3 + 1).to(dtype).contiguous(memory_format=fmt)
            want = F.group_norm(x.float(), norm.num_groups, norm.weight, norm.bias, norm.eps).to(dtype)
            got = norm(x)
            assert got.dtype == dtype
            ulp = 2.0 ** -(7 if dtype == torch.bfloat16 else 10)
            torch.testing.assert_close(got.float(), want.float(), atol=1e-6, rtol=ulp)
            assert (got != want).float().mean() < 0.01, "only a rare element may round the other way"
    x = torch.randn(2, 64, 4, 4, generator=g)
    torch.testing.assert_close(norm(x), F.group_norm(x, 32, norm.weight, norm.bias, norm.eps))


def test_groupnorm_in_low_precision_is_the_fp32_round_trip_up_to_the_affines_rounding():
    """The GPU's path (``low_precision_group_norm``: x, gamma and beta in bf16, autocast off),
    run here on a CPU: the fp32 round trip's numbers within a few bf16 steps (gamma and beta
    are rounded to bf16 too), and no fp32 copy of the activation under autocast."""
    norm = GroupNorm32(64, group_channels=4)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (torch.randn(3, 64, 8, 8, generator=torch.Generator().manual_seed(1)) * 3 + 1)
    x = x.bfloat16().contiguous(memory_format=torch.channels_last)
    want = F.group_norm(x.float(), norm.num_groups, norm.weight, norm.bias, norm.eps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            got = low_precision_group_norm(x, norm)
    assert got.dtype == torch.bfloat16
    err = (got.float() - want).abs() / (want.abs() + 1)
    assert err.max() < 4 * 2.0 ** -7 and err.mean() < 2.0 ** -8, (err.max(), err.mean())
    copies = [e.input_shapes[0] for e in prof.events() if e.name == "aten::_to_copy"]
    assert copies and all(shape == [64] for shape in copies), copies   # gamma and beta only


@pytest.mark.parametrize("kind", sorted(ARCHS))
@pytest.mark.parametrize("channels_last,bf16", [(True, False), (False, True), (True, True)])
def test_fast_forward_matches_fp32(kind, channels_last, bf16):
    net = woken(kind).eval()
    x, t = batch()
    with torch.no_grad():
        ref = net(x, t)
        fp = FastPath("cpu", bf16=bf16, channels_last=channels_last)
        fp.prepare(net, "cpu")
        with fp.autocast():
            y = net(fp.input(x, "cpu"), t)
    assert ref.abs().max() > 0
    assert rel_err(y, ref) < (3e-2 if bf16 else 1e-5)


# ---- the fast iFormer mixer -------------------------------------------------------------

def woken_mixer(d: int, high: int, stride: int) -> InceptionMixer:
    torch.manual_seed(0)
    m = InceptionMixer(d, high, 8, stride)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_on_channels_last_is_gelu(dtype, approximate):
    """The NHWC-view GELU: the function of F.gelu (up to one rounding), the input's memory
    format kept, gradients too; NCHW and 3-D inputs take F.gelu unchanged."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 24, 6, 5, generator=g).to(dtype)
    act = GELU(approximate=approximate)
    exact = F.gelu(x.double(), approximate=approximate)
    one_rounding = {torch.float32: 1e-6, torch.bfloat16: 2 ** -8}[dtype]
    xl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    y = act(xl)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    torch.testing.assert_close(y.double(), exact, rtol=one_rounding, atol=one_rounding)
    y.backward(torch.ones_like(y))
    xd = x.double().requires_grad_()
    F.gelu(xd, approximate=approximate).sum().backward()
    torch.testing.assert_close(xl.grad.double(), xd.grad, rtol=4 * one_rounding, atol=4 * one_rounding)
    assert xl.grad.is_contiguous(memory_format=torch.channels_last)
    for plain in (x, x[0]):                                     # NCHW, and a 3-D tensor
        assert torch.equal(act(plain), F.gelu(plain, approximate=approximate))


@pytest.mark.parametrize("shape", [(2, 6, 7, 5), (1, 3, 1, 4), (1, 2, 1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_separable_max_pool_is_max_pool(shape, channels_last):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(*shape, generator=g).to(torch.bfloat16)
    x[0, 0, 0, 0] = float("-inf")                                # padding must never win over a real -inf
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = F.max_pool2d(x, 3, stride=1, padding=1)
    y = max_pool3x3(x)
    assert torch.equal(y, ref)
    assert y.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("d,high,stride", [(32, 16, 2), (32, 24, 1), (48, 0, 2), (64, 8, 1)])
def test_fast_mixer_matches_reference(d, high, stride):
    m = woken_mixer(d, high, stride).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, d, 12, 12, generator=g)
    with torch.no_grad():
        ref = m.reference_forward(x)
        assert torch.equal(m(x), m.fast_forward(x))              # eval + no_grad takes the fast path
        torch.testing.assert_close(m.fast_forward(x), ref, rtol=1e-5, atol=1e-5)
        m.to(memory_format=torch.channels_last)
        xl = x.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast_bf16, ref_bf16 = m.fast_forward(xl), m.reference_forward(xl)
    # within bf16 tolerance of the reference: no further from fp32 than the reference's own bf16 run
    assert rel_err(fast_bf16, ref) < max(2 * rel_err(ref_bf16, ref), 1e-2)


@pytest.mark.parametrize("batch,stride", [(1, 2), (1, 1), (2, 2)])
def test_low_mixer_keeps_channels_last(batch, stride):
    """A channels_last input (a channel slice of one, as in the mixer) gives a channels_last
    output with the values of the NCHW path: an NCHW one makes the fusion conv transpose
    the whole concatenation (batch 1 included, where strides are ambiguous)."""
    torch.manual_seed(0)
    low = LowMixer(16, 8, stride).eval()
    x = torch.randn(batch, 24, 12, 12)
    xl = x.to(memory_format=torch.channels_last)[:, 8:]
    with torch.no_grad():
        ref, y = low(x[:, 8:].contiguous()), low(xl)
        up = F.interpolate(y, scale_factor=2.0, mode="nearest")
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.stride(0) == y[0].numel()
    assert up.is_contiguous(memory_format=torch.channels_last)   # what the next op sees


def test_fast_mixer_only_in_inference():
    m = woken_mixer(32, 16, 2)
    x = torch.randn(2, 32, 8, 8)
    assert torch.equal(m(x), m.reference_forward(x))             # training mode: the reference
    m.eval()
    assert torch.equal(m(x), m.reference_forward(x))             # gradients on: the reference
    with torch.no_grad(), reference_mixers():
        assert torch.equal(m(x), m.reference_forward(x))         # MACs counting: the reference
    # same parameters, same state-dict keys: checkpoints of the reference load unchanged
    assert list(m.state_dict()) == list(woken_mixer(32, 16, 2).state_dict())


def test_fast_mixer_network_matches_reference():
    net = woken("iunet").eval()
    x, t = batch()
    with torch.no_grad():
        y = net(x, t)
        with reference_mixers():
            ref = net(x, t)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_network_without_iformer_blocks_is_the_network_with_them_passed_through():
    """nas.bench.run times the iFormer blocks by difference: the copy without them must compute
    exactly what the network computes when each block returns its input."""
    net = woken("iunet").eval()
    rest = without_iformer_blocks(net)
    assert not any(isinstance(m, IFormerBlock) for m in rest.modules())
    assert sum(isinstance(m, IFormerBlock) for m in net.modules()) == 2, "the original keeps its blocks"
    x, t = batch(2)
    with torch.no_grad():
        full = net(x, t)
        hooks = [m.register_forward_hook(lambda mod, args, out: args[0])
                 for m in net.modules() if isinstance(m, IFormerBlock)]
        passed = net(x, t)
        for h in hooks:
            h.remove()
        torch.testing.assert_close(rest(x, t), passed, atol=0, rtol=0)
    assert rel_err(passed, full) > 1e-3, "the blocks do shape the output, so leaving them out is seen"


@pytest.mark.parametrize("kind", sorted(ARCHS))
def test_bf16_gradients_point_the_same_way(kind):
    """A training step's gradient under bf16 autocast + channels_last agrees with fp32's."""
    x, t = batch()
    grads = []
    for fp in (FastPath("cpu", False, False), FastPath("cpu", True, True)):
        net = woken(kind)
        fp.prepare(net, "cpu")
        with fp.autocast():
            loss = net(fp.input(x, "cpu"), t).float().square().mean()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    cos = F.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos > 0.99, float(cos)
    assert rel_err(grads[1], grads[0]) < 0.1


def tiny_meme() -> MemeConfig:
    return MemeConfig(name="tiny", experts=(ARCHS["iunet"], ARCHS["unet"]), data=TINY, boundaries=(0, 400, 1000),
                      expert_probs=(0.8, 0.4)).validate()


def test_bf16_sampling_close_to_fp32_and_schedules_still_agree():
    cfg = tiny_meme()
    den = wake_zero_init(build_denoiser(cfg), seed=3)
    diff = Diffusion(cfg.diffusion)
    plan = SamplingPlan(n=4, steps=6, batch_size=2, seed=0, eta=0.5)
    shape = (1, 16, 16)
    ref = generate(den, diff, shape, plan, "cpu", precision="fp32")
    fast = generate(den, diff, shape, plan, "cpu", precision="bf16")
    low = generate(den, diff, shape, plan, "cpu", low_memory=True, precision="bf16")
    assert rel_err(fast, ref) < 3e-2
    torch.testing.assert_close(low, fast, atol=0, rtol=0)


def casts_during(fn) -> int:
    """How many dtype conversions (``aten::_to_copy``, what autocast's casts run as) ``fn`` makes."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")


def test_sampler_casts_the_weights_once_per_run_not_per_step():
    """Each extra step adds a few input casts, not one cast per weight: autocast's weight
    cache lives as long as the region, and the sampler keeps one region per run of steps."""
    cfg = MemeConfig(name="one", experts=(ARCHS["iunet"],), data=TINY).validate()
    den = wake_zero_init(build_denoiser(cfg), seed=3)
    diff = Diffusion(cfg.diffusion)
    n_weights = sum(1 for m in den.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))

    def casts(steps: int) -> int:
        plan = SamplingPlan(n=2, steps=steps, batch_size=2)
        return casts_during(lambda: generate(den, diff, (1, 16, 16), plan, "cpu", precision="bf16"))

    casts(2)                               # first call: one-off conversions (schedule tables, ...)
    per_step = (casts(6) - casts(2)) / 4
    # casting per step would add one per weight and bias (~2 per layer: 114 here); inputs and
    # the fast mixer's fused (non-leaf, so uncached) weights add ~20
    assert 0 < per_step < n_weights / 2, (per_step, n_weights)


def test_trainer_runs_on_the_forced_bf16_path(tmp_path):
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).standard_normal((16, 1, 16, 16)).astype(np.float32))
    losses = {}
    for prec in ("fp32", "bf16"):
        opts = TrainOptions(data=str(data), steps=4, batch_size=4, warmup=1, sample_every=0, precision=prec,
                            device="cpu")
        tr = Trainer(tiny_meme(), opts, tmp_path / prec)
        assert tr.fast.bf16 == (prec == "bf16")
        assert next(tr.model.parameters()).dtype == torch.float32, "autocast keeps fp32 master weights"
        losses[prec] = [tr.step()[1] for _ in range(4)]
    for a, b in zip(losses["fp32"], losses["bf16"]):
        assert abs(a - b) < 0.05 * abs(a)


def test_compiled_inference_matches_eager():
    """compile_for_inference (inductor, frozen weights) computes what eager does."""
    pytest.importorskip("torch._inductor")
    net = woken("iunet").eval()
    x, t = batch(2)
    with torch.no_grad():
        ref = net(x, t)
        y = compile_for_inference(net)(x, t)
    assert rel_err(y, ref) < 1e-4


def test_compile_with_low_memory_is_a_user_error():
    from meme.common.errors import UserError

    cfg = tiny_meme()
    with pytest.raises(UserError, match="--compile and --low-memory"):
        generate(build_denoiser(cfg), Diffusion(cfg.diffusion), (1, 16, 16), SamplingPlan(n=1, steps=2), "cpu",
                 low_memory=True, compile=True)


def test_compiled_training_step_matches_eager(tmp_path):
    """TrainOptions(compile=True) trains the same numbers and checkpoints the same keys."""
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).standard_normal((16, 1, 16, 16)).astype(np.float32))
    one_stage = ArchConfig(kind="iunet", base_channels=16, channel_mult=(1,), num_res_blocks=1, head_channels=8,
                           high_ratios=("1/2",), pool_strides=(2,))      # the smallest graph: compiling is slow
    cfg = MemeConfig(name="one", experts=(one_stage,), data=TINY)
    runs = {}
    for compiled in (False, True):
        opts = TrainOptions(data=str(data), steps=2, batch_size=4, warmup=1, sample_every=0, precision="fp32",
                            device="cpu", compile=compiled)
        tr = Trainer(cfg, opts, tmp_path / str(compiled))
        runs[compiled] = ([float(tr.step()[1]) for _ in range(2)], tr.state()["model"])
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-4)
    assert runs[True][1].keys() == runs[False][1].keys()


def _fused_tensors(m: InceptionMixer, dense: bool) -> list[torch.Tensor]:
    f = m.fused_weights(dense)
    return [f.fc_weight, f.fc_bias, f.dw_weight, f.fuse_weight]


@pytest.mark.parametrize("dense", [False, True], ids=["fp32-groups", "bf16-dense"])
def test_fused_mixer_weights_are_cached_until_a_parameter_changes(dense):
    """Built once per parameter version: a second call reuses them; an optimizer step, a
    loaded state and a moved storage rebuild them, equal to what a fresh build gives."""
    torch.manual_seed(0)
    m = wake_zero_init(InceptionMixer(32, 16, 8, 1))
    x = torch.randn(2, 32, 8, 8)
    first = m.fused_weights(dense)
    assert m.fused_weights(dense) is first                      # served from the cache

    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m.reference_forward(x).square().mean().backward()
    opt.step()
    after_step = m.fused_weights(dense)
    assert after_step is not first
    fresh = wake_zero_init(InceptionMixer(32, 16, 8, 1))
    fresh.load_state_dict(m.state_dict())                       # a new module: nothing cached
    for a, b in zip(_fused_tensors(m, dense), _fused_tensors(fresh, dense)):
        assert torch.equal(a, b)

    other = wake_zero_init(InceptionMixer(32, 16, 8, 1), seed=5)
    m.load_state_dict(other.state_dict())                       # in-place copies into the same parameters
    for a, b in zip(_fused_tensors(m, dense), _fused_tensors(other, dense)):
        assert torch.equal(a, b)

    before = m.fused_weights(dense)
    m.to(memory_format=torch.channels_last)                     # storage moved, version unchanged
    assert m.fused_weights(dense) is not before
    m.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dense):
        y = m(x)
        ref = m.reference_forward(x)
    assert rel_err(y.float(), ref.float()) < (2e-2 if dense else 1e-5)


def test_sliced_weights_from_functional_call_are_never_cached():
    """The supernet runs one parameter-less template mixer with new slices every call:
    nothing may be served from a cache there (a freed slice's address is reused)."""
    torch.manual_seed(0)
    a = wake_zero_init(InceptionMixer(32, 16, 8, 1), seed=1).eval()
    b = wake_zero_init(InceptionMixer(32, 16, 8, 1), seed=2).eval()
    x = torch.randn(1, 32, 8, 8)
    with torch.device("meta"):
        template = InceptionMixer(32, 16, 8, 1).eval()
    with torch.no_grad():
        for src in (a, b, a):
            params = {k: v.clone() for k, v in src.state_dict().items()}
            assert torch.equal(functional_call(template, params, (x,)), src(x))
    assert template._fused is None


def test_compile_budget_holds_every_graph_and_fails_instead_of_falling_back_past_it():
    """Networks of one class share dynamo's recompile limit (8): a 9th distinct graph runs
    eager, silently. Inside compile_budget(n) the limit is n + DYNAMO_ROOM, and past it
    dynamo raises. (backend 'eager': only dynamo's counting is under test, not inductor.)"""
    import torch._dynamo

    class Net(torch.nn.Module):
        def __init__(self, width: int):
            super().__init__()
            self.lin = torch.nn.Linear(4, width)

        def forward(self, x):
            return self.lin(x).relu()

    x = torch.randn(2, 4)

    def compile_all(k: int):
        torch._dynamo.reset()
        return [torch.compile(Net(4 + i), backend="eager") for i in range(k)]

    try:
        with compile_budget(10):
            for net in compile_all(10):
                net(x)                                          # 10 graphs, none refused
        with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
            with compile_budget(2):                            # limit 2 + 8: the 11th fails loudly
                for net in compile_all(2 + DYNAMO_ROOM + 1):
                    net(x)
        assert torch._dynamo.config.recompile_limit == 8 and not torch._dynamo.config.fail_on_recompile_limit_hit
    finally:
        torch._dynamo.reset()
