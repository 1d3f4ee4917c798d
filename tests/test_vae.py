"""The causal 3D VAE: parity with diffusers' AutoencoderKLWan, causal chunking, loading, bad inputs."""

from __future__ import annotations

import pytest
import torch

from vgen.models.vae import CausalCache, Tiling, VAEConfig, WanVAE, build_vae, load_vae_weights
from vgen.models.vae.layers import CausalConv3d
from vgen.models.vae.tiling import temporal_chunks

torch.set_num_threads(1)

TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
# a second layout: other widths, a separate decoder width, 2 res blocks, time halved at the first levels
ODD = dict(
    base_dim=4, decoder_base_dim=6, z_dim=3, dim_mult=[1, 2, 3, 2], num_res_blocks=2,
    temperal_downsample=[True, True, False],
)  # fmt: skip


def tiny_vae(**over) -> WanVAE:
    torch.manual_seed(0)
    return WanVAE(VAEConfig.from_dict({**TINY, **over})).eval()


def video(t, h=16, w=24, b=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def AutoencoderKLWan():
    diffusers = pytest.importorskip("diffusers", reason="diffusers (test-only dependency) is not installed")
    return diffusers.AutoencoderKLWan


def diffusers_pair(AutoencoderKLWan, kw):
    """A random diffusers VAE (gains perturbed so they matter) and ours loaded from its state dict."""
    torch.manual_seed(0)
    ref = AutoencoderKLWan(**kw, latents_mean=[0.0] * kw["z_dim"], latents_std=[1.0] * kw["z_dim"]).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.add_(0.2 * torch.randn_like(p))
    ours = WanVAE(VAEConfig.from_dict(kw)).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.fill_(float("nan"))  # anything the load does not overwrite stays NaN
    load_vae_weights(ours, ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("kw,size", [(TINY, (16, 24)), (ODD, (24, 16))], ids=["tiny", "odd"])
def test_matches_diffusers(AutoencoderKLWan, kw, size):
    ref, ours = diffusers_pair(AutoencoderKLWan, kw)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(ref_sd) == list(our_sd)
    assert all(torch.equal(ref_sd[k], our_sd[k]) for k in ref_sd), "a parameter was not mapped by the load"
    for t in (1, 5, 9, 17):
        x = video(t, *size, b=2 if t == 5 else 1)
        with torch.no_grad():
            dist = ref.encode(x).latent_dist
            rec = ref.decode(dist.mean).sample
        mean, logvar = ours.encode_moments(x)
        ours_rec = ours.decode(dist.mean, normalize=False)
        err_z, err_lv = (mean - dist.mean).abs().max().item(), (logvar - dist.logvar).abs().max().item()
        err_x = (ours_rec - rec).abs().max().item()
        print(f"{kw['base_dim']=} T={t}: latent err {err_z:.2e}, logvar err {err_lv:.2e}, recon err {err_x:.2e}")
        assert mean.shape == (x.shape[0], kw["z_dim"], 1 + (t - 1) // 4, size[0] // 8, size[1] // 8)
        assert rec.shape == ours_rec.shape == x.shape
        assert err_z <= 1e-5 and err_lv <= 1e-5 and err_x <= 1e-5
        assert (rec.abs() < 1).float().mean() > 0.5, "reconstruction saturated: the comparison would be weak"


def test_wan21_layout_matches_diffusers(AutoencoderKLWan):
    """The default config has exactly the keys and shapes of diffusers' Wan-2.1 VAE (built on meta)."""
    with torch.device("meta"):
        ref, ours = AutoencoderKLWan(), WanVAE()
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ref_shapes == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert len(ref_shapes) == 194
    mean, std = VAEConfig().latent_stats()
    assert mean == pytest.approx(ref.config.latents_mean) and std == pytest.approx(ref.config.latents_std)


def test_normalised_latents_round_trip():
    vae = tiny_vae(latents_mean=[0.5, -1.0, 0.0, 2.0], latents_std=[2.0, 1.0, 0.5, 4.0])
    x = video(5)
    raw, norm = vae.encode(x, normalize=False), vae.encode(x)
    torch.testing.assert_close(norm, (raw - vae.latents_mean) / vae.latents_std)
    torch.testing.assert_close(vae.decode(norm), vae.decode(raw, normalize=False))


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_chunked_equals_unchunked(chunk):
    vae = tiny_vae(**ODD)
    x, z = video(17, 24, 16), torch.randn(1, 3, 5, 3, 2)
    enc = vae.encode(x, tiling=Tiling(chunk=None))
    dec = vae.decode(z, tiling=Tiling(chunk=None))
    assert (vae.encode(x, tiling=Tiling(chunk=chunk)) - enc).abs().max() <= 1e-5
    assert (vae.decode(z, tiling=Tiling(chunk=chunk)) - dec).abs().max() <= 1e-5


def test_chunking_needs_the_cache():
    """The cache carries real state: without it, chunks see zeros instead of their past."""
    torch.manual_seed(0)
    conv = CausalConv3d(3, 4, 3, padding=1)
    x = torch.randn(1, 3, 9, 5, 6)
    with torch.no_grad():
        whole, cache = conv(x), CausalCache()
        carried = torch.cat([conv(x[:, :, i : i + 3], cache) for i in range(0, 9, 3)], 2)
        fresh = torch.cat([conv(x[:, :, i : i + 3], CausalCache()) for i in range(0, 9, 3)], 2)
    assert cache.nbytes() == 2 * 3 * 5 * 6 * 4  # the last 2 input frames
    assert (carried - whole).abs().max() <= 1e-6
    assert (fresh - whole)[:, :, 3:].abs().max() > 1e-2
    # and through the whole decoder: one latent frame at a time with one cache == one pass
    vae, z = tiny_vae(), torch.randn(1, 4, 3, 2, 3)
    with torch.no_grad():
        cache = CausalCache()
        chunks = [vae.decoder(z[:, :, l0:l1], cache) for (l0, l1), _ in temporal_chunks(3, 1, 4)]
        assert [c.shape[2] for c in chunks] == [1, 4, 4]
        assert (torch.cat(chunks, 2) - vae.decoder(z)).abs().max() <= 1e-5


def test_build_vae_from_config(tmp_path):
    from safetensors.torch import save_file

    from vgen.config import AutoencoderConfig
    from vgen.models.autoencoder import build_autoencoder

    src = tiny_vae()
    path = str(tmp_path / "vae.safetensors")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, path)
    cfg = AutoencoderConfig(kind="vae", weights=path, vae={**TINY, "_class_name": "AutoencoderKLWan"})
    vae = build_autoencoder(cfg)
    assert isinstance(vae, torch.nn.Module) and not vae.training
    assert vae.latent_channels == 4 and vae.latent_shape(9, 16, 24) == (4, 3, 2, 3)
    x = video(9)
    torch.testing.assert_close(vae.encode(x), src.encode(x), rtol=0, atol=0)
    assert vae.decode(vae.encode(x)).shape == x.shape


@pytest.mark.parametrize(
    "frames,h,w,match",
    [(6, 16, 16, r"6 frames.*1 \+ 4k.*5 or 9"), (0, 16, 16, "0 frames"), (5, 20, 16, "multiples of 8")],
)
def test_bad_video_raises(frames, h, w, match):
    with pytest.raises(ValueError, match=match):
        tiny_vae().encode(torch.zeros(1, 3, frames, h, w))


def test_bad_latent_raises():
    with pytest.raises(ValueError, match=r"latent must be \(B, 4"):
        tiny_vae().decode(torch.zeros(1, 16, 2, 2, 2))
    with pytest.raises(ValueError, match="T', H', W' >= 1"):
        tiny_vae().decode(torch.zeros(1, 4, 0, 2, 2))


def test_bad_state_dict_raises():
    vae, state = tiny_vae(), dict(tiny_vae().state_dict())
    state["decoder.conv_in.weight"] = torch.zeros(1, 2, 3, 3, 3)
    del state["encoder.norm_out.gamma"]
    state["encoder.extra.weight"] = torch.zeros(7)
    with pytest.raises(ValueError) as err:
        load_vae_weights(vae, state)
    msg = str(err.value)
    print(msg)
    assert "decoder.conv_in.weight: expected (16, 4, 3, 3, 3), got (1, 2, 3, 3, 3)" in msg
    assert "1 missing keys" in msg and "encoder.norm_out.gamma: expected (16, 1, 1, 1)" in msg
    assert "1 unexpected keys" in msg and "encoder.extra.weight: got (7,)" in msg
    # a checkpoint of another width: many mismatches, only the first few listed
    with pytest.raises(ValueError, match=r"keys with wrong shapes") as err:
        load_vae_weights(vae, tiny_vae(base_dim=16).state_dict())
    assert str(err.value).count("expected") == 5


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(base_dims=8), r"unknown keys \['base_dims'\]; known keys"),
        (dict(temperal_downsample=[True]), "needs one per downsampling: 3"),
        (dict(is_residual=True), "only the Wan-2.1 VAE"),
        (dict(latents_mean=[0.0] * 3), "latents_mean has 3 values, z_dim=4"),
        (dict(tile_size=36), "multiples of the spatial ratio 8"),
        (dict(tile_size=64, tile_overlap=64), "tile_overlap=64"),
        (dict(chunk_frames=0), "chunk_frames=0"),
    ],
)
def test_bad_config_raises(over, match):
    with pytest.raises(ValueError, match=match):
        VAEConfig.from_dict({**TINY, **over})


def test_bad_weights_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_vae_weights(tiny_vae(), str(tmp_path / "missing.safetensors"))
    (tmp_path / "vae.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="expected a .safetensors file"):
        load_vae_weights(tiny_vae(), str(tmp_path / "vae.pth"))
