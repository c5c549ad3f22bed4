"""Latent diffusion end to end with a real (tiny, random) diffusers AutoencoderKL saved to disk:
encode -> train -> sample -> decode -> FID, the latent file's metadata, resumable encoding,
and the one-line refusals that write nothing."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from meme.common.errors import UserError
from meme.data.autoencoder import encode_images, load_autoencoder, load_decoder  # noqa: E402
from meme.data.dataset import load_data  # noqa: E402
from meme.data.latents import LatentInfo, latent_info  # noqa: E402
from meme.model.config import ArchConfig, DataShape, DiffusionConfig, MemeConfig  # noqa: E402
from meme.sampling import evaluate, sample  # noqa: E402
from meme.training import first_stage_cli as autoencoder  # noqa: E402  (the encode/train command line)
from meme.training import train as meme_train  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
N_IMAGES = 100          # 5 held-out: enough for k=3 precision/recall in the FID objective


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """FID statistics in a private folder (subprocesses inherit it)."""
    monkeypatch.setenv("MEME_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "meme-cache"))


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    """A random 1x16x16 -> 2x8x8 AutoencoderKL in diffusers format (no download)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=2, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=0.5)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """Smooth random grey 16x16 PNGs."""
    folder = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.interpolate(torch.rand(N_IMAGES, 1, 4, 4, generator=g), size=16, mode="bilinear")
    for i, img in enumerate((x[:, 0] * 255).round().byte().numpy()):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def latents(tmp_path_factory, vae_dir, image_dir) -> Path:
    out = tmp_path_factory.mktemp("enc") / "latents.pt"
    assert autoencoder.main(["encode", "--vae", str(vae_dir), "--data", str(image_dir), "--out", str(out),
                             "--chunk", "32", "--batch-size", "16", "--device", "cpu"]) == 0
    return out


def latent_cfg(channels: int = 2) -> MemeConfig:
    iunet = ArchConfig(kind="iunet", base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                       head_channels=8, high_ratios=("1/2", "1/4"), pool_strides=(1, 1), attention_ds=())
    return MemeConfig(name="latent-tiny", experts=(iunet, iunet), data=DataShape(channels, 8, latent=True),
                      diffusion=DiffusionConfig(), expert_probs=(0.8, 0.4)).validate()


def train_args(cfg_path: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(cfg_path), "--data", str(data), "--out", str(out), "--steps", "4", "--batch-size", "8",
            "--warmup", "1", "--ckpt-every", "2", "--sample-every", "0", "--log-every", "1", "--device", "cpu", *extra]


def images_of(folder: Path) -> torch.Tensor:
    return load_data(str(folder), DataShape(1, 16, latent=False), "all")


def assert_refused(capsys, rc: int, fragment: str) -> None:
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and fragment in err and "\n" not in err, err


# ---- encoding ----------------------------------------------------------------------------
def test_encode_stores_scaled_latents_and_the_metadata_to_decode_them(latents, vae_dir, image_dir):
    stored = torch.load(latents, weights_only=True)
    info = LatentInfo.from_dict(stored["autoencoder"], "test")
    assert info == latent_info(latents)
    ae = load_autoencoder(vae_dir)
    z = ae.encode(images_of(image_dir))                         # posterior mean, unscaled
    assert stored["latents"].shape == (N_IMAGES, 2, 8, 8)
    assert info.scaling == "measured" and info.scaling_factor == pytest.approx(1 / float(z.std()), rel=1e-5)
    torch.testing.assert_close(stored["latents"], z * info.scaling_factor)
    assert float(stored["latents"].std()) == pytest.approx(1.0, rel=1e-4)
    assert (info.autoencoder, info.kind, info.posterior) == (str(vae_dir.resolve()), "kl", "mean")
    assert (info.image_channels, info.image_resolution, info.latent_shape, info.n) == (1, 16, (2, 8, 8), N_IMAGES)
    assert info.data == str(image_dir.resolve())
    assert not latents.with_name(latents.name + ".parts").exists()     # chunks cleaned up
    # decoding the stored latents is the autoencoder's decode of z (the scale divided out)
    decoded = load_decoder(info)(stored["latents"][:5])
    torch.testing.assert_close(decoded, ae.decode(z[:5]))
    assert decoded.shape == (5, 1, 16, 16)


def test_encode_is_deterministic_and_scaling_can_come_from_the_config(tmp_path, latents, vae_dir, image_dir):
    again = tmp_path / "again.pt"
    assert autoencoder.main(["encode", "--vae", str(vae_dir), "--data", str(image_dir), "--out", str(again),
                             "--chunk", "7", "--device", "cpu"]) == 0
    torch.testing.assert_close(torch.load(again, weights_only=True)["latents"],
                               torch.load(latents, weights_only=True)["latents"])
    cfg = tmp_path / "cfg.pt"
    assert autoencoder.main(["encode", "--vae", str(vae_dir), "--data", str(image_dir), "--out", str(cfg),
                             "--scaling", "config", "--device", "cpu"]) == 0
    info = latent_info(cfg)
    assert (info.scaling, info.scaling_factor) == ("config", 0.5)
    sampled = tmp_path / "sampled.pt"
    assert autoencoder.main(["encode", "--vae", str(vae_dir), "--data", str(image_dir), "--out", str(sampled),
                             "--sample", "--device", "cpu"]) == 0
    assert latent_info(sampled).posterior == "sample"
    assert not torch.allclose(torch.load(sampled, weights_only=True)["latents"],
                              torch.load(latents, weights_only=True)["latents"])


def test_encoding_continues_after_the_last_finished_chunk(tmp_path, vae_dir, image_dir):
    ae = load_autoencoder(vae_dir)
    x = images_of(image_dir)
    parts = tmp_path / "parts"
    first = encode_images(x[:32], ae, parts, chunk=32, progress=False)       # "killed" after chunk 0
    marker = torch.full_like(first, 7.0)
    torch.save(marker, parts / "chunk-000000.pt")
    z = encode_images(x, ae, parts, chunk=32, progress=False)
    assert torch.equal(z[:32], marker)                                      # read back, not re-encoded
    torch.testing.assert_close(z[32:], ae.encode(x[32:]))


def test_encode_refuses_a_parts_folder_of_other_settings(tmp_path, capsys, vae_dir, image_dir):
    out = tmp_path / "z.pt"
    parts = tmp_path / "z.pt.parts"
    parts.mkdir()
    (parts / "manifest.json").write_text(json.dumps({"autoencoder": "other"}))
    rc = autoencoder.main(["encode", "--vae", str(vae_dir), "--data", str(image_dir), "--out", str(out)])
    assert_refused(capsys, rc, "other settings")
    assert not out.exists() and sorted(p.name for p in parts.iterdir()) == ["manifest.json"]


def test_missing_autoencoder_path_is_one_line_and_writes_nothing(tmp_path, capsys, image_dir):
    out = tmp_path / "z.pt"
    rc = autoencoder.main(["encode", "--vae", str(tmp_path / "no-such-vae"), "--data", str(image_dir),
                           "--out", str(out)])
    assert_refused(capsys, rc, f"autoencoder not found: {tmp_path / 'no-such-vae'}")
    assert list(tmp_path.iterdir()) == []


def test_encode_refuses_latents_as_input(tmp_path, capsys, latents, vae_dir):
    out = tmp_path / "z.pt"
    rc = autoencoder.main(["encode", "--vae", str(vae_dir), "--data", str(latents), "--out", str(out)])
    assert_refused(capsys, rc, "is a latent file: encode takes images")
    assert list(tmp_path.iterdir()) == []


# ---- refusals where latents are expected ------------------------------------------------------
def test_image_folder_where_latents_are_expected_is_refused(tmp_path, capsys, image_dir):
    cfg_path = latent_cfg().save(tmp_path / "cfg.yaml")
    rc = meme_train.main(train_args(cfg_path, image_dir, tmp_path / "run"))
    assert_refused(capsys, rc, "is images, but the config's data is latent (2x8x8)")
    rc = meme_train.main(train_args(cfg_path, "fashion-mnist", tmp_path / "run"))
    assert_refused(capsys, rc, "fashion-mnist is images")
    assert not (tmp_path / "run").exists()


def test_latents_of_another_shape_are_refused(tmp_path, capsys, latents):
    cfg_path = latent_cfg(channels=4).save(tmp_path / "cfg.yaml")
    rc = meme_train.main(train_args(cfg_path, latents, tmp_path / "run"))
    assert_refused(capsys, rc, "latents have shape [100, 2, 8, 8], config data wants N x 4 x 8 x 8")
    assert not (tmp_path / "run").exists()


def test_latents_without_metadata_are_refused_when_asked_to_decode(tmp_path, capsys, latents):
    bare = tmp_path / "bare.npy"
    np.save(bare, torch.load(latents, weights_only=True)["latents"].numpy())
    cfg_path = latent_cfg().save(tmp_path / "cfg.yaml")
    run = tmp_path / "run"
    assert meme_train.main(train_args(cfg_path, bare, run)) == 0
    capsys.readouterr()
    rc = sample.main(["--run", str(run), "--n", "4", "--steps", "2", "--device", "cpu"])
    assert_refused(capsys, rc, "without autoencoder metadata")
    assert not (run / "samples").exists()
    from nas.promote.promote import check_target_data
    with pytest.raises(UserError, match="without autoencoder metadata"):
        check_target_data(latent_cfg(), str(bare))
    check_target_data(latent_cfg(), str(latents))      # with metadata: accepted


# ---- the whole pipeline ------------------------------------------------------------------------
def test_encode_train_sample_decode_fid_end_to_end(tmp_path, capsys, latents, image_dir):
    cfg_path = latent_cfg().save(tmp_path / "cfg.yaml")
    run = tmp_path / "run"
    assert meme_train.main(train_args(cfg_path, latents, run, "--sample-every", "4", "--sample-steps", "2")) == 0
    with Image.open(run / "grids" / "step0000004.png") as grid:       # decoded 16x16 tiles, not 8x8 latents
        assert grid.size == (8 * 18 + 2,) * 2
    assert sample.main(["--run", str(run), "--n", "6", "--steps", "3", "--device", "cpu"]) == 0
    with np.load(run / "samples" / "samples.npz") as z:
        assert z["samples"].shape == (6, 16, 16, 1) and z["samples"].dtype == np.uint8
    assert json.loads((run / "samples" / "sampling.json").read_text())["decoded"] is True
    capsys.readouterr()
    assert evaluate.main(["--run", str(run), "--n", "6", "--n-ref", "8", "--device", "cpu"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert ev["ref"] == str(image_dir.resolve()) and (ev["resolution"], ev["channels"]) == (16, 1)
    assert np.isfinite(ev["fid"]) and ev["fid"] > 0
    # raw latent channels are never scored
    assert sample.main(["--run", str(run), "--n", "6", "--steps", "3", "--device", "cpu", "--no-decode",
                        "--out", str(tmp_path / "raw")]) == 0
    capsys.readouterr()
    rc = evaluate.main(["--run", str(run), "--samples", str(tmp_path / "raw" / "samples.npz"), "--n", "6",
                        "--out", str(tmp_path / "raw-eval.json")])
    assert_refused(capsys, rc, "not decoded")
    assert not (tmp_path / "raw-eval.json").exists()


def test_fid_objective_of_a_search_decodes_latent_proxies(latents, image_dir, monkeypatch):
    """A latent proxy's FID objective is the FID of its samples *decoded* by the file's
    autoencoder, scored against the images that were encoded: the trial's objective is the
    FID of image-shaped pixels from the decoder its latent file names, and that measurement
    agrees with the same one done by hand (DDIM samples -> load_decoder -> FID)."""
    from meme.common.fastpath import fast_path
    from meme.common.images import to_uint8
    from meme.model.diffusion import Diffusion
    from meme.model.experts import build_denoiser
    from meme.sampling.sample import SamplingPlan, generate
    from nas.evaluators import trial
    from nas.evaluators.trial import run_trial, sample_fid
    from nas.space.proxy import ProxySpec, proxy_config

    decoders, scored = [], []

    def spy_decoder(info, device):
        decoders.append(info)
        return load_decoder(info, device)

    def spy_evaluate(images, **kw):
        result = evaluate.evaluate_samples(images, **kw)
        scored.append((images, result["fid"]))
        return result

    trial._decoder.cache_clear()                 # a decoder cached by an earlier test would hide the load
    monkeypatch.setattr(trial, "load_decoder", spy_decoder)
    monkeypatch.setattr(trial, "evaluate_samples", spy_evaluate)
    proxy = ProxySpec(data=str(latents), resolution=8, channels=2, width_mult=1, steps=2, eval_every=2,
                      fid_samples=6, fid_steps=2, eval_batch=4, limit_data=None, precision="fp32")
    result = run_trial(latent_cfg(), proxy, lambda step, value: False, objective="fid", device="cpu", threads=1)
    trial._decoder.cache_clear()
    assert decoders == [latent_info(latents)]    # the file's own autoencoder decoded the samples
    images, fid = scored[-1]
    assert images.shape == (6, 16, 16, 1) and images.dtype == np.uint8   # pixels, not 2x8x8 latents
    assert result.objective == pytest.approx(fid) and np.isfinite(fid) and fid > 0
    monkeypatch.undo()

    torch.manual_seed(0)
    model = build_denoiser(proxy_config(latent_cfg(), proxy))
    diffusion = Diffusion(proxy_config(latent_cfg(), proxy).diffusion)
    plan = SamplingPlan(n=proxy.fid_samples, steps=proxy.fid_steps, seed=proxy.seed + 777, batch_size=64)
    raw = generate(model, diffusion, (2, 8, 8), plan, "cpu", precision="fp32")
    images = to_uint8(load_decoder(latent_info(latents))(raw))
    assert images.shape == (6, 16, 16, 1)                  # decoded pictures, not 2x8x8 latents
    by_hand = evaluate.evaluate_samples(images, ref=str(image_dir.resolve()), n_ref=1000, split="val",
                                        device="cpu")["fid"]
    got = sample_fid(model, diffusion, proxy, torch.device("cpu"), fast_path("cpu", "fp32", model), latent_target=True)
    assert got == pytest.approx(by_hand, rel=1e-6)


def test_pixel_path_never_imports_diffusers():
    code = ("import sys, meme.training.train, meme.sampling.sample, meme.sampling.evaluate, meme.data.dataset, meme.data.latents, nas.evaluators.trial, nas.promote.promote;"
            "sys.exit('diffusers' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


# ---- training a small autoencoder ----------------------------------------------------------------
def test_train_saves_a_loadable_autoencoder_with_its_metrics(tmp_path, capsys, image_dir):
    out = tmp_path / "ae"
    args = ["train", "--data", str(image_dir), "--out", str(out), "--resolution", "16", "--widths", "8", "8",
            "--latent-channels", "2", "--steps", "3", "--batch-size", "4", "--n-eval", "5", "--device", "cpu"]
    assert autoencoder.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["latent_shape"] == [2, 8, 8] and metrics["n_eval"] == 5
    assert metrics["psnr_db"] == pytest.approx(10 * np.log10(1 / metrics["mse"]))
    assert np.isfinite(metrics["rfid"]) and metrics["rfid"] > 0
    assert (out / "reconstructions.png").is_file()
    ae = load_autoencoder(out)                                 # diffusers format, scale recorded
    assert ae.kind == "kl" and ae.config.scaling_factor == pytest.approx(metrics["scaling_factor"])
    capsys.readouterr()
    before = sorted(p.name for p in out.iterdir())
    assert_refused(capsys, autoencoder.main(args), "already exists")
    assert sorted(p.name for p in out.iterdir()) == before


def test_vq_autoencoder_encodes_pre_quantisation_latents_and_decodes_them(tmp_path, image_dir):
    from diffusers import VQModel

    torch.manual_seed(0)
    vq = VQModel(in_channels=1, out_channels=1, latent_channels=2, block_out_channels=(8, 8),
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 norm_num_groups=4, num_vq_embeddings=16, sample_size=16)
    vq.save_pretrained(tmp_path / "vq")
    out = tmp_path / "vq.pt"
    assert autoencoder.main(["encode", "--vae", str(tmp_path / "vq"), "--data", str(image_dir), "--out", str(out),
                             "--limit", "10", "--device", "cpu"]) == 0
    info = latent_info(out)
    assert (info.kind, info.n, info.latent_shape) == ("vq", 10, (2, 8, 8))
    x = images_of(image_dir)[:10]
    with torch.no_grad():
        h = vq.eval().encode(x).latents
        torch.testing.assert_close(torch.load(out, weights_only=True)["latents"], h * info.scaling_factor)
        torch.testing.assert_close(load_decoder(info)(h[:3] * info.scaling_factor),
                                   vq.decode(h[:3]).sample.clamp(-1, 1))
