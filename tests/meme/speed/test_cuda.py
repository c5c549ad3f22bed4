"""What only a GPU can show (skipped elsewhere; ``tools/gpu_rows.sh`` runs ``pytest -m cuda``):
the cached fused mixer weights on CUDA; that the EMA update and drawing a batch from
device-resident data never wait for the host (``torch.cuda.set_sync_debug_mode``); CUDA-graph
sampling equal to eager within bf16 rounding, one capture per (expert, batch size), kept
across calls until the weights move, and refused outside its plan; GroupNorm under bf16
autocast without an fp32 copy of its input."""
from __future__ import annotations

import pytest
import torch

from meme.common.fastpath import fast_path
from meme.model.blocks import GroupNorm32, InceptionMixer
from meme.model.config import ArchConfig, DataShape, DiffusionConfig, MemeConfig
from meme.model.diffusion import Diffusion
from meme.model.experts import SoftExpertSampler, build_denoiser, wake_zero_init
from meme.sampling.graphs import GraphedExperts, graphed_experts
from meme.sampling.sample import SamplingPlan, generate
from meme.training.train import EMA, draw_batch, resident

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEV = torch.device("cuda")


def _cfg() -> MemeConfig:
    iunet = ArchConfig(kind="iunet", base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                       head_channels=8, high_ratios=("1/2", "1/4"), pool_strides=(2, 1))
    return MemeConfig(name="tiny", experts=(iunet,), data=DataShape(1, 16, False),
                      diffusion=DiffusionConfig.ddpm_pixels()).validate()


def test_fused_mixer_on_cuda_matches_the_reference_and_is_built_once():
    torch.manual_seed(0)
    m = wake_zero_init(InceptionMixer(64, 32, 8, 1)).to(DEV).eval()
    x = torch.randn(4, 64, 16, 16, device=DEV)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        y = m(x)
        first = m._fused
        y2 = m(x)
        ref = m.reference_forward(x)
    assert m._fused is first and torch.equal(y, y2)
    assert ((y.float() - ref.float()).norm() / ref.float().norm()) < 2e-2


def test_ema_update_and_batches_from_resident_data_do_not_sync():
    model = build_denoiser(_cfg()).to(DEV)
    ema = EMA(model, 0.999)
    data = resident(torch.randn(64, 1, 16, 16), DEV)
    assert data.device.type == "cuda"
    fp, gen = fast_path(DEV, "auto"), torch.Generator().manual_seed(0)
    ema.update_parameters(model)     # the first update copies; warm-up of the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            ema.update_parameters(model)
            draw_batch(data, SoftExpertSampler(_cfg()), 0, 16, gen, fp, DEV)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def _two_experts() -> MemeConfig:
    unet = ArchConfig(kind="unet", base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_ds=(2,),
                      head_channels=16)
    return MemeConfig(name="two", experts=(unet, _cfg().experts[0]), data=DataShape(1, 16, False),
                      diffusion=DiffusionConfig.ddpm_pixels()).validate()


def test_cuda_graph_sampling_equals_eager_and_captures_once_per_expert_and_batch_size():
    cfg = _two_experts()
    torch.manual_seed(0)
    den = wake_zero_init(build_denoiser(cfg))
    diff, shape = Diffusion(cfg.diffusion), (1, 16, 16)
    plan = SamplingPlan(n=6, steps=8, batch_size=4, seed=3)        # batches of 4 and 2
    eager = generate(den, diff, shape, plan, DEV, cuda_graphs=False)
    graphed = generate(den, diff, shape, plan, DEV, cuda_graphs=True)
    assert ((graphed - eager).norm() / eager.norm()) < 2e-2
    fp = fast_path(DEV, "auto", den)
    kept = graphed_experts(den, list(den.experts), [4, 2], fp, DEV, variant=False)
    assert kept.budget == 4 and len(kept.graphs) == 4               # 2 experts x 2 batch sizes, nothing more
    again = generate(den, diff, shape, plan, DEV, cuda_graphs=True)
    assert torch.equal(again, graphed) and graphed_experts(den, list(den.experts), [4, 2], fp, DEV, variant=False) is kept
    with torch.no_grad():                  # updated in place (the fused mixer's weights derive from these)
        for p in den.parameters():
            p.mul_(0.5)
    halved_eager = generate(den, diff, shape, plan, DEV, cuda_graphs=False)
    halved = generate(den, diff, shape, plan, DEV, cuda_graphs=True)
    assert ((halved - halved_eager).norm() / halved_eager.norm()) < 2e-2
    anew = graphed_experts(den, list(den.experts), [4, 2], fp, DEV, variant=False)
    assert anew is not kept
    den.cpu()               # moved away and back: the graphs read the weights where they are now
    moved = generate(den, diff, shape, plan, DEV, cuda_graphs=True)
    assert ((moved - halved_eager).norm() / halved_eager.norm()) < 2e-2


def test_a_graph_outside_the_plan_is_refused_not_run_eager():
    cfg = _two_experts()
    den = build_denoiser(cfg).to(DEV).eval()
    graphs = GraphedExperts(list(den.experts), [4], fast_path(DEV, "auto", den), DEV)
    graphs(0, torch.randn(4, 1, 16, 16, device=DEV), 10)
    with pytest.raises(RuntimeError, match="no CUDA graph planned"):
        graphs(1, torch.randn(2, 1, 16, 16, device=DEV), 10)


def test_low_memory_sampling_with_graphs_matches_normal():
    cfg = _two_experts()
    torch.manual_seed(1)
    den = wake_zero_init(build_denoiser(cfg))
    diff, plan = Diffusion(cfg.diffusion), SamplingPlan(n=4, steps=6, batch_size=2, seed=0)
    normal = generate(den, diff, (1, 16, 16), plan, DEV, cuda_graphs=True)
    low = generate(den, diff, (1, 16, 16), plan, DEV, low_memory=True, cuda_graphs=True)
    assert ((low - normal).norm() / normal.norm()) < 2e-2


def test_group_norm_under_autocast_makes_no_fp32_copy_of_its_input():
    norm = GroupNorm32(64, group_channels=4).to(DEV)
    x = torch.randn(8, 64, 32, 32, device=DEV).to(memory_format=torch.channels_last)
    ref = torch.nn.functional.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        xb = x.bfloat16()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            y = norm(xb)
    assert y.dtype == torch.bfloat16
    assert ((y.float() - ref).norm() / ref.norm()) < 1e-2
    big_copies = [e for e in prof.events() if e.name == "aten::_to_copy"
                  and e.input_shapes and e.input_shapes[0] and e.input_shapes[0][0] == 8]
    assert not big_copies, "GroupNorm cast its activation to fp32 and back"


def test_one_gpu_holds_several_proxy_trials_of_the_tiny_space():
    from nas.evaluators.device_share import measure_share
    from nas.space.space import load_space

    share = measure_share(load_space("tiny"), "cuda")
    assert share.peak_mib > 0 and 0 < share.busy <= 1 and share.free_mib > share.peak_mib
    assert share.trials >= 2, share.describe()
