"""The training step's parts that keep a GPU from waiting on the host, checked on a CPU:
the EMA (count on the host, values of the AveragedModel form bit for bit), batches drawn
from where the data lives, and AdamW's kernel per device."""
from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel

from meme.common.fastpath import fast_path
from meme.model.config import ArchConfig, DataShape, DiffusionConfig, MemeConfig
from meme.model.experts import SoftExpertSampler, build_denoiser
from meme.training.options import TrainOptions
from meme.training.train import EMA, adamw, draw_batch, resident


def tiny_cfg() -> MemeConfig:
    iunet = ArchConfig(kind="iunet", base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                       head_channels=8, high_ratios=("1/2", "1/4"), pool_strides=(2, 1))
    return MemeConfig(name="tiny", experts=(iunet, iunet), data=DataShape(1, 16, False),
                      diffusion=DiffusionConfig.ddpm_pixels(), expert_probs=(0.8, 0.4)).validate()


def _ema_reference(model: torch.nn.Module, decay: float) -> AveragedModel:
    """The form the EMA had: AveragedModel with a multi_avg_fn reading the count on the device."""
    def update(ema_params, params, num_averaged):
        n = int(num_averaged)
        torch._foreach_lerp_(ema_params, params, 1.0 - min(decay, (1 + n) / (10 + n)))
    return AveragedModel(model, multi_avg_fn=update)


def test_ema_equals_the_averaged_model_form_bit_for_bit_and_keeps_its_count_on_the_host():
    torch.manual_seed(0)
    model = build_denoiser(tiny_cfg())
    ema, ref = EMA(model, 0.99), _ema_reference(model, 0.99)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        ema.update_parameters(model)
        ref.update_parameters(model)
    for a, b in zip(ema.module.state_dict().values(), ref.module.state_dict().values()):
        assert torch.equal(a, b)
    assert int(ema.n_averaged) == 5 and ema.n_averaged.device.type == "cpu"
    assert not torch.equal(next(ema.module.parameters()), next(model.parameters()))   # it averages


def test_batches_are_the_same_whatever_the_data_lives_on():
    """draw_batch indexes the data where it is, with the same stream; on a CPU resident() is a no-op."""
    cfg = tiny_cfg()
    data = torch.randn(40, 1, 16, 16)
    assert resident(data, torch.device("cpu")) is data
    fp = fast_path("cpu", "fp32")
    draws = [draw_batch(data, SoftExpertSampler(cfg), 1, 8, torch.Generator().manual_seed(3), fp, torch.device("cpu"))
             for _ in range(2)]
    for a, b in zip(*draws):
        assert torch.equal(a, b)
    x0, t, noise = draws[0]
    assert x0.shape == (8, 1, 16, 16) and t.dtype == torch.long and noise.shape == x0.shape


def test_adamw_is_fused_on_cuda_only():
    p = [torch.nn.Parameter(torch.zeros(3))]
    o = TrainOptions()
    assert adamw(p, o, torch.device("cuda")).defaults["fused"] is True
    assert not adamw(p, o, torch.device("cpu")).defaults["fused"]
