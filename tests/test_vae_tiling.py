"""Spatial tiling of the causal VAE: tile placement, blend weights, error vs untiled, seams, flat memory."""

from __future__ import annotations

import pytest
import torch

from vgen.models.vae import Tiling, VAEConfig, WanVAE
from vgen.models.vae.memory import measure_peak
from vgen.models.vae.tiling import axis_weights, temporal_chunks, tile_starts, tiled_apply

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    cfg = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    return WanVAE(VAEConfig.from_dict(cfg)).eval()


@pytest.mark.parametrize("size,tile,overlap", [(32, 8, 2), (33, 8, 3), (9, 8, 1), (8, 8, 2), (40, 8, 0)])
def test_tile_starts_cover_with_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == max(size, tile)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(tile - g >= overlap for g in gaps), "adjacent tiles overlap less than asked"
    assert len(starts) == 1 or (len(starts) - 2) * (tile - overlap) < size - tile, "more tiles than needed"


def test_axis_weights_sum_to_one_and_ramp_linearly():
    starts, tile, size, scale = tile_starts(20, 8, 2), 8, 20, 4
    weights = axis_weights(starts, tile, size, scale)
    total = torch.zeros(size * scale, dtype=torch.float64)
    for w, s in zip(weights, starts):
        assert w.min() > 0
        total[s * scale : (s + tile) * scale] += w
    torch.testing.assert_close(total, torch.ones_like(total))
    ov = (starts[0] + tile - starts[1]) * scale
    ramp = weights[1][:ov]
    torch.testing.assert_close(ramp.diff(), torch.full((ov - 1,), 1.0 / (ov + 1), dtype=torch.float64))


def test_tiled_apply_is_exact_for_a_pointwise_stream():
    """A per-pixel 'decoder' (nearest 8x upsample, in temporal chunks) must be reproduced exactly."""
    z = torch.randn(2, 3, 4, 7, 11)

    def stream(tile):
        for (l0, l1), (p0, _) in temporal_chunks(tile.shape[2], 2, 4):
            y = tile[:, :, l0:l1].repeat_interleave(8, -1).repeat_interleave(8, -2) * 2
            yield p0, y.repeat_interleave(4, 2)[:, :, 3:] if l0 == 0 else y.repeat_interleave(4, 2)

    want = (z * 2).repeat_interleave(8, -1).repeat_interleave(8, -2).repeat_interleave(4, 2)[:, :, 3:]
    got = tiled_apply(stream, z, want.shape, (7, 11), 1, 8, Tiling(tile=(24, 32), overlap=16), 8)
    torch.testing.assert_close(got, want)


def test_one_tile_equals_untiled(vae):
    z = torch.randn(1, 4, 3, 4, 6)
    x = torch.rand(1, 3, 9, 32, 48) * 2 - 1
    big = Tiling(tile=64, overlap=16)
    assert torch.equal(vae.decode(z, tiling=big), vae.decode(z))
    assert torch.equal(vae.encode(x, tiling=big), vae.encode(x))


def smooth_latent(t=2, h=8, w=32, seed=0):
    """Low-frequency stripes plus mild noise: an image whose own gradients are small and even."""
    yy, xx = torch.meshgrid(torch.arange(h) / h, torch.arange(w) / w, indexing="ij")
    waves = torch.stack([torch.sin(6.283 * (1.5 * xx + 0.5 * yy) + k) for k in range(4)])
    g = torch.Generator().manual_seed(seed)
    return waves[None, :, None].repeat(1, 1, t, 1, 1) + 0.3 * torch.randn(1, 4, t, h, w, generator=g)


def test_tiled_error_vs_untiled(vae):
    """Random weights make tile-border effects large, so the bound is loose; more overlap must help."""
    z = smooth_latent()
    ref = vae.decode(z)
    errs = {}
    for overlap in (0, 16, 32):
        out = vae.decode(z, tiling=Tiling(tile=64, overlap=overlap))
        errs[overlap] = (out - ref).abs().mean().item() / ref.std().item()
        print(f"decode tile 64 overlap {overlap}: mean |err| / std = {errs[overlap]:.3f}")
    assert errs[32] < errs[16] < errs[0] and errs[32] < 0.35
    x = torch.rand(1, 3, 5, 64, 160) * 2 - 1
    ref = vae.encode(x)
    err = (vae.encode(x, tiling=Tiling(tile=64, overlap=32)) - ref).abs().mean().item() / ref.std().item()
    print(f"encode tile 64 overlap 32: mean |err| / std = {err:.3f}")
    assert err < 0.35


def seam_ratio(img: torch.Tensor, edges: list[int], margin: int = 8) -> float:
    """Mean horizontal gradient magnitude at tile borders over that elsewhere (image borders excluded).

    Column c of the gradient is |img[..., c + 1] - img[..., c]|; a border at pixel e touches c = e - 2 ... e.
    """
    g = (img[..., 1:] - img[..., :-1]).abs().mean(dim=(0, 1, 2, 3))
    cols = torch.arange(g.numel())
    near = torch.zeros_like(cols, dtype=torch.bool)
    for e in edges:
        near |= (cols >= e - 2) & (cols <= e)
    inside = (cols >= margin) & (cols < g.numel() - margin)
    return (g[near & inside].mean() / g[~near & inside].mean()).item()


def tile_edges(width_cells: int, tile_px: int, overlap_px: int, ratio: int = 8) -> list[int]:
    starts = tile_starts(width_cells, tile_px // ratio, overlap_px // ratio)
    ends = [(s + tile_px // ratio) * ratio - 1 for s in starts[:-1]]
    return sorted({s * ratio for s in starts[1:]} | set(ends))


def test_no_visible_seams(vae):
    z = smooth_latent()
    blended = vae.decode(z, tiling=Tiling(tile=64, overlap=32))
    hard = vae.decode(z, tiling=Tiling(tile=64, overlap=0))  # abutting tiles: the seams blending removes
    untiled = vae.decode(z)
    r_blend = seam_ratio(blended, tile_edges(32, 64, 32))
    r_hard = seam_ratio(hard, tile_edges(32, 64, 0))
    r_none = seam_ratio(untiled, tile_edges(32, 64, 32))
    print(f"seam gradient ratio: blended {r_blend:.2f}, hard-cut {r_hard:.2f}, untiled {r_none:.2f}")
    assert r_hard > 2.0, "the seam measure does not see hard seams"
    assert r_blend < 1.3


def test_tiled_decode_memory_is_flat(vae):
    """Working memory (peak above what stays allocated: the output) must not grow with the video."""
    tiled, untiled = Tiling(tile=32, overlap=8), Tiling(chunk=1)
    sizes = {"base": (3, 8, 8), "2x length": (5, 8, 8), "2x width": (3, 8, 16)}
    mem = {}
    for name, (t, h, w) in sizes.items():
        z = torch.randn(1, 4, t, h, w)
        _, tiled_use = measure_peak(lambda: vae.decode(z, tiling=tiled))
        mem[name] = [tiled_use]
        if name != "2x length":  # untiled is chunked in time too: only width matters for it
            mem[name].append(measure_peak(lambda: vae.decode(z, tiling=untiled))[1])
        print(
            f"{name:9s} latent {t}x{h}x{w}: output {tiled_use.retained / 2**20:.2f} MiB; tiled peak "
            f"{tiled_use.peak / 2**20:.2f} MiB, working {tiled_use.transient / 2**20:.2f} MiB"
            + (f"; untiled working {mem[name][1].transient / 2**20:.2f} MiB" if len(mem[name]) > 1 else "")
        )
    base = mem["base"][0].transient
    for name, uses in mem.items():
        assert uses[0].transient <= 1.15 * base, f"{name}: tiled working memory grew"
        assert len(uses) == 1 or uses[0].peak < uses[1].peak
    assert mem["2x width"][1].transient > 1.5 * mem["base"][1].transient, "untiled should grow with width"
