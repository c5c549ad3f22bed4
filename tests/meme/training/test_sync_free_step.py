"""The training step's parts that keep a GPU from waiting on the host, checked on a CPU:
the EMA (count on the host, values of the AveragedModel form bit for bit), batches drawn
from where the data lives, and AdamW's kernel per device."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from meme.common import checkpoint

from meme.common.fastpath import fast_path
from meme.model.config import ArchConfig, DataShape, DiffusionConfig, MemeConfig
from meme.model.experts import SoftExpertSampler, build_denoiser
from meme.training.options import TrainOptions
from meme.training.train import EMA, Trainer, TrainingDiverged, adamw, draw_batch, resident, train


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


def _opts(blobs, **kw) -> TrainOptions:
    base = dict(data=str(blobs), steps=10, batch_size=8, lr=1e-3, warmup=2, ckpt_every=5, sample_every=0,
                log_every=5, device="cpu", threads=1)
    return TrainOptions(**{**base, **kw})


def test_looking_at_the_loss_every_k_steps_changes_nothing_on_a_finite_run(tmp_path, blobs):
    runs = {}
    for every in (1, 4):
        out = tmp_path / f"every{every}"
        train(tiny_cfg(), _opts(blobs, check_every=every), out, progress=False)
        runs[every] = (pd.read_csv(out / "metrics.csv").loss.tolist(),
                       checkpoint.load_training(out / "checkpoints" / "last.pt")["model"])
    assert runs[1][0] == runs[4][0]
    for k, v in runs[1][1].items():
        assert torch.equal(v, runs[4][1][k]), k


def _poisoned_trainer(tmp_path, blobs, every: int) -> Trainer:
    trainer = Trainer(tiny_cfg(), _opts(blobs, check_every=every), tmp_path / "run")
    trainer.step()                                   # step 0: finite
    with torch.no_grad():
        next(trainer.model.experts[1].parameters()).fill_(float("nan"))   # expert 1 trains at step 1
    return trainer


def test_a_deferred_nan_is_caught_before_any_checkpoint_is_written(tmp_path, blobs):
    trainer = _poisoned_trainer(tmp_path, blobs, every=4)
    trainer.step()                                   # step 1: NaN loss, not looked at yet (no host read)
    trainer.step()                                   # step 2
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 1; stopped\. Last good checkpoint: none"):
        trainer.save()
    assert not trainer.ckpt_path.exists()
    trainer.step_count = 3
    with pytest.raises(TrainingDiverged, match="at step 1"):   # the fourth step looks on its own
        trainer.step()


def test_looking_every_step_stops_before_the_update(tmp_path, blobs):
    trainer = _poisoned_trainer(tmp_path, blobs, every=1)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 1 \(expert 1\)"):
        trainer.step()
    assert not any(p in trainer.opt.state for p in trainer.model.experts[1].parameters())   # AdamW never stepped it
    assert trainer.step_count == 1
