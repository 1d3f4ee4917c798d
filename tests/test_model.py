"""Shapes, gradient flow, the attention groupings and the presets of the video DiT."""

import torch

from vgen.models import VideoDiT, resolve_preset
from vgen.models.attention import AttentionCore, group_tokens, ungroup_tokens
from vgen.models.autoencoder import PatchAutoencoder
from vgen.models.rope import apply_rope, rope_tables

torch.set_num_threads(1)


def tiny(**kw):
    torch.manual_seed(0)
    return VideoDiT(resolve_preset("tiny", hidden=64, depth=2, heads=4, **kw))


def inputs(B=2, T=4, H=8, W=6, L=5, C=12, text_dim=384):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, C, T, H, W, generator=g)
    text = torch.randn(B, L, text_dim, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 3:] = False
    return x, torch.rand(B, generator=g), text, mask


def test_forward_shape_matches_input():
    model = tiny()
    x, t, text, mask = inputs()
    assert model(x, t, text, mask).shape == x.shape


def test_gradient_reaches_every_parameter_of_every_block():
    model = tiny()
    # adaLN-Zero starts every block as the identity with zero gates, so no gradient reaches the attention
    # weights at init; give gates and the final layer values, as after some training
    for name, p in model.named_parameters():
        if "ada" in name or "final.linear" in name:
            torch.nn.init.normal_(p, std=0.02)
    model(*inputs()).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    assert len(model.blocks) == 2


def test_blocks_start_as_identity():
    model = tiny()
    x, t, text, mask = inputs()
    assert model(x, t, text, mask).abs().max() == 0  # zero-initialised final layer


def test_spatial_attention_mixes_only_within_a_frame():
    core = AttentionCore("spatial")
    grid = (3, 2, 2)
    q = torch.randn(1, 12, 2, 8, requires_grad=True)
    k, v = torch.randn(1, 12, 2, 8), torch.randn(1, 12, 2, 8)
    core(q, k, v, grid)[0, 0].sum().backward()  # token 0 sits in frame 0
    assert q.grad[0, 1:4].abs().sum() == 0 and q.grad[0, 0].abs().sum() > 0
    k.requires_grad_(True)
    core(q.detach(), k, v, grid)[0, 0].sum().backward()
    assert k.grad[0, 4:].abs().sum() == 0 and k.grad[0, :4].abs().sum() > 0


def test_temporal_attention_mixes_only_one_position():
    core = AttentionCore("temporal")
    grid = (3, 2, 2)
    k = torch.randn(1, 12, 2, 8, requires_grad=True)
    q, v = torch.randn(1, 12, 2, 8), torch.randn(1, 12, 2, 8)
    core(q, k, v, grid)[0, 1].sum().backward()  # position 1 of frame 0
    touched = sorted((k.grad[0].abs().sum((1, 2)) > 0).nonzero().flatten().tolist())
    assert touched == [1, 5, 9]  # position 1 in frames 0, 1, 2


def test_group_ungroup_roundtrip():
    x = torch.randn(2, 24, 3, 4)
    for kind in ("spatial", "temporal", "full"):
        assert torch.equal(ungroup_tokens(group_tokens(x, kind, (2, 3, 4)), kind, (2, 3, 4), 2), x)


def test_cross_attention_ignores_masked_text():
    model = tiny()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t, text, mask = inputs()
    changed = text.clone()
    changed[1, 3:] = 100.0  # masked-out tokens of sample 1
    assert torch.allclose(model(x, t, text, mask), model(x, t, changed, mask), atol=1e-6)


def test_rope_preserves_norm_and_is_relative():
    cos, sin = rope_tables((2, 3, 4), 16)
    x = torch.randn(1, 24, 2, 16)
    assert torch.allclose(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    q = torch.randn(1, 1, 1, 16).expand(1, 24, 1, 16)
    rq, rk = apply_rope(q, cos, sin), apply_rope(q, cos, sin)
    # same vector at two token pairs with the same (t, h, w) offset -> same score
    s1 = (rq[0, 0] * rk[0, 5]).sum()  # offsets (0, 1, 1)
    s2 = (rq[0, 12] * rk[0, 17]).sum()
    assert torch.allclose(s1, s2, atol=1e-5)


def test_patch_autoencoder_is_exact():
    ae = PatchAutoencoder((1, 2, 2))
    video = torch.randn(2, 3, 4, 8, 6)
    latent = ae.encode(video)
    assert latent.shape == (2, 12, 4, 4, 3)
    assert torch.equal(ae.decode(latent), video)


def test_bad_shapes_are_named():
    import pytest

    with pytest.raises(ValueError, match="model.patch"):
        tiny()(*inputs(T=4, H=7))
    with pytest.raises(KeyError, match="known presets"):
        resolve_preset("7b")


def test_2b_preset_parameter_count():
    with torch.device("meta"):
        model = VideoDiT(resolve_preset("2b"))
    count = sum(p.numel() for p in model.parameters())
    print(f"2b preset: {count / 1e9:.3f}B parameters")
    assert abs(count - 2.0e9) / 2.0e9 < 0.10


def test_flops_estimate_matches_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny()
    x, t, text, mask = inputs(B=2, T=4, H=8, W=8, L=5)
    with FlopCounterMode(display=False) as counter:
        model(x, t, text, mask)
    measured = 3 * counter.get_total_flops() / 2  # per sample; backward = 2x forward
    estimate = model.flops_per_sample(x.shape[1:], 5)
    assert abs(estimate - measured) / measured < 0.05, (estimate, measured)
