"""What only a GPU can show (skipped elsewhere; ``tools/gpu_rows.sh`` runs ``pytest -m cuda``):
the cached fused mixer weights on CUDA, and that the EMA update and drawing a batch from
device-resident data never wait for the host (``torch.cuda.set_sync_debug_mode``)."""
from __future__ import annotations

import pytest
import torch

from meme.common.fastpath import fast_path
from meme.model.blocks import InceptionMixer
from meme.model.config import ArchConfig, DataShape, DiffusionConfig, MemeConfig
from meme.model.experts import SoftExpertSampler, build_denoiser, wake_zero_init
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
