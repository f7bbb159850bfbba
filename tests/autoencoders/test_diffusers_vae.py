"""diffusers' VAEs as vdm autoencoders: encode is diffusers' own `latent_dist.mean` normalized as its pipelines
normalize, decode inverts it the same way; shapes follow the VAE (spatial factor, Wan's causal 1 + rk frames);
real weights come only from a local folder of safetensors."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLWan

from tests.runs import run_train, train_two_steps
from vdm.autoencoders.diffusers_vae import KLAutoencoder, WanAutoencoder
from vdm.data.video import probe

# configs the code was not written against: other widths, depths, channels, an SD-like and a FLUX-like scaling
KL_CONFIGS = {
    "sd-like": dict(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                    up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4,
                    scaling_factor=0.18215),
    "flux-like": dict(block_out_channels=[8, 8, 16], down_block_types=["DownEncoderBlock2D"] * 3,
                      up_block_types=["UpDecoderBlock2D"] * 3, latent_channels=16, norm_num_groups=8,
                      scaling_factor=0.3611, shift_factor=0.1159, layers_per_block=2),
}  # fmt: skip
WAN_CONFIGS = {
    "2x-time": dict(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
                    latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.7, 2.0, 1.0]),
    "4x-time": dict(base_dim=4, z_dim=6, dim_mult=[1, 1, 2], num_res_blocks=1, temperal_downsample=[True, True],
                    latents_mean=[0.0, 0.5, -0.5, 0.1, 0.2, -0.1], latents_std=[1.0, 2.0, 0.5, 1.5, 1.1, 0.9]),
}  # fmt: skip


def clip(frames: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, frames, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("name", sorted(KL_CONFIGS))
def test_kl_encodes_each_frame_as_diffusers_and_decodes_the_same_way(name):
    config = KL_CONFIGS[name]
    ours = KLAutoencoder(config=config, seed=3)
    torch.manual_seed(3)
    theirs = AutoencoderKL(**config).eval()
    video = clip(3)
    latents = ours.encode(video)
    f = 2 ** (len(config["block_out_channels"]) - 1)
    assert (
        latents.shape == (2, config["latent_channels"], 3, 16 // f, 16 // f)
        and ours.latent_channels == latents.shape[1]
    )
    assert ours.latent_shape(3, 16, 16) == latents.shape[2:]
    scale, shift = config["scaling_factor"], config.get("shift_factor") or 0.0
    with torch.no_grad():
        for frame in range(3):
            mean = theirs.encode(video[:, :, frame]).latent_dist.mean
            assert torch.allclose(latents[:, :, frame], (mean - shift) * scale, atol=1e-5)
            decoded = theirs.decode(latents[:, :, frame] / scale + shift).sample
            assert torch.allclose(ours.decode(latents)[:, :, frame], decoded, atol=1e-5)
    with pytest.raises(ValueError, match="spatial factor"):
        ours.latent_shape(3, 16 + f // 2 if f > 1 else 17, 16)


@pytest.mark.parametrize("name", sorted(WAN_CONFIGS))
def test_wan_encodes_clips_causally_as_diffusers_with_its_channel_statistics(name):
    config = WAN_CONFIGS[name]
    ours = WanAutoencoder(config=config, seed=5)
    torch.manual_seed(5)
    theirs = AutoencoderKLWan(**config).eval()
    r = 2 ** sum(config["temperal_downsample"])
    video = clip(1 + 2 * r)
    latents = ours.encode(video)
    f = 2 ** (len(config["dim_mult"]) - 1)
    assert (
        latents.shape
        == (2, config["z_dim"], 3, 16 // f, 16 // f)
        == (2, ours.latent_channels, *ours.latent_shape(1 + 2 * r, 16, 16))
    )
    mean = torch.tensor(config["latents_mean"]).view(1, -1, 1, 1, 1)
    std = torch.tensor(config["latents_std"]).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        expected = (theirs.encode(video).latent_dist.mean - mean) / std
        assert torch.allclose(latents, expected, atol=1e-5)
        decoded = ours.decode(latents)
        assert decoded.shape == video.shape
        assert torch.allclose(decoded, theirs.decode(latents * std + mean).sample, atol=1e-5)
    with pytest.raises(ValueError, match=f"1 \\+ {r}k frames"):
        ours.latent_shape(2 * r, 16, 16)


def test_weights_come_from_a_local_folder_of_safetensors_and_never_a_pickle(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(**KL_CONFIGS["sd-like"]).eval()
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    loaded = KLAutoencoder(path=tmp_path / "vae")
    video = clip(2)
    with torch.no_grad():
        expected = vae.encode(video[:, :, 0]).latent_dist.mean * 0.18215
        assert torch.allclose(loaded.encode(video)[:, :, 0], expected, atol=1e-6)
    assert not any(p.requires_grad for p in loaded.parameters())
    loaded.train()
    assert not loaded.vae.training
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "vae" / "config.json").read_text())
    torch.save(vae.state_dict(), pickled / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="pickles, never read"):
        KLAutoencoder(path=pickled)


@pytest.mark.parametrize(
    ("autoencoder", "frames", "latent"),
    [("kl_tiny", 8, [4, 8, 8, 8]), ("wan_tiny", 9, [4, 5, 8, 8])],  # latent (c, t, h, w); Wan: 1 + 2k frames
)
def test_train_py_trains_in_latent_space_and_writes_decoded_samples(tmp_path, autoencoder, frames, latent):
    run = train_two_steps(
        tmp_path,
        f"autoencoder={autoencoder}",
        f"data.num_frames={frames}",
        "data.frame_stride=1",  # 9 frames of the bundled 16-frame clips
        "model.patch_size=[1,2,2]",
        "data.eval_clips=16",
        "sampling.steps=2",
    )
    config = (run / "config.yaml").read_text()
    assert f"in_channels: {latent[0]}" in config  # the network's channels follow the autoencoder
    samples = sorted((run / "samples").glob("*.mp4"))
    assert samples and samples[-1].stat().st_size > 0
    frames_read = probe(samples[-1].read_bytes()).num_frames
    assert frames_read == frames  # decoded back to the clip's length, not the latent one


def test_a_clip_length_the_wan_vae_cannot_take_is_a_config_error_naming_it(tmp_path):
    result = run_train("autoencoder=wan_tiny", "data.num_frames=8", f"run_root={tmp_path}", "logger=none")
    assert result.returncode == 2 and "1 + 2k frames" in result.stderr, result.stderr[-2000:]
