"""Image-to-video conditioning, the loss mask, the sampler holding the given frame, and the absolute
position embedding that lets the model place content by frame (the demo's direction finding)."""

from __future__ import annotations

import torch

from vgen.diffusion.flow import flow_matching_loss
from vgen.models import VideoDiT, resolve_preset
from vgen.train.i2v import condition_batch, draw_given, given_mask


def tiny_dit(**over) -> VideoDiT:
    torch.manual_seed(0)
    model = VideoDiT(resolve_preset("tiny", hidden=32, depth=2, heads=2, in_channels=12, text_dim=16, **over))
    with torch.no_grad():  # leave adaLN-Zero's identity start: random weights everywhere
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(0.2 * torch.randn(p.shape))
    return model.eval()


def test_mask_and_frame_replacement():
    x0, xt = torch.zeros(3, 2, 4, 2, 2), torch.ones(3, 2, 4, 2, 2)
    out, mask = condition_batch(xt, x0, torch.tensor([0, 1, 2]))
    assert mask.shape == (3, 1, 4, 2, 2)
    assert mask[:, 0, :, 0, 0].tolist() == [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert out[:, 0, :, 0, 0].tolist() == [[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]]
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert draw_given(5, gen, 0.0, 1).tolist() == [0] * 5 and torch.equal(gen.get_state(), state)  # t2v draws nothing
    assert set(draw_given(200, gen, 0.5, 2).tolist()) == {0, 2}


def test_loss_covers_only_generated_frames():
    g = torch.Generator().manual_seed(0)
    x0, noise, pred = (torch.randn(2, 3, 4, 2, 2, generator=g) for _ in range(3))
    weight = 1.0 - given_mask(x0.shape, torch.tensor([1, 0]))
    loss = flow_matching_loss(pred, x0, noise, weight=weight)
    spoiled = pred.clone()
    spoiled[0, :, 0] += 100.0  # a given frame: not scored
    assert torch.equal(flow_matching_loss(spoiled, x0, noise, weight=weight), loss)
    err = (pred - (noise - x0)).pow(2)
    expect = (err[0, :, 1:].sum() + err[1].sum()) / (err[0, :, 1:].numel() + err[1].numel())
    torch.testing.assert_close(loss, expect)
    assert torch.equal(flow_matching_loss(pred, x0, noise), err.mean())


def test_condition_input_starts_as_text_to_video():
    model = tiny_dit(cond_channels=1)
    torch.nn.init.zeros_(model.cond_embed.weight), torch.nn.init.zeros_(model.cond_embed.bias)
    x, t = torch.randn(2, 12, 4, 4, 4), torch.tensor([0.3, 0.8])
    text, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    fm = given_mask(x.shape, torch.tensor([1, 1]))
    assert torch.equal(model(x, t, text, mask), model(x, t, text, mask, frame_mask=fm))
    with torch.no_grad():
        model.cond_embed.weight.fill_(0.1), model.cond_embed.bias.fill_(0.1)
    assert not torch.allclose(model(x, t, text, mask), model(x, t, text, mask, frame_mask=fm))
    nothing_given = given_mask(x.shape, torch.tensor([0, 0]))  # what text-to-video training samples see
    assert torch.equal(model(x, t, text, mask), model(x, t, text, mask, frame_mask=nothing_given))


def test_absolute_position_lets_a_constant_input_vary_by_frame():
    """The demo's finding in one assertion: from an input the same at every token (what pure noise looks
    like on average), a RoPE-only DiT gives every frame the same output, so it cannot lay down where a
    'moving left' shape is at frame 0 vs frame 7; with the absolute embedding it can."""
    x = torch.full((1, 12, 4, 4, 4), 0.5)
    text, mask, t = torch.randn(1, 5, 16), torch.ones(1, 5, dtype=torch.bool), torch.tensor([0.9])
    with torch.no_grad():
        rope_only = tiny_dit()(x, t, text, mask)
        absolute = tiny_dit(abs_pos=True)(x, t, text, mask)
    spread = lambda y: (y - y[:, :, :1]).abs().max().item()  # noqa: E731  (every frame vs frame 0)
    assert spread(rope_only) < 1e-4, spread(rope_only)
    assert spread(absolute) > 1e-2, spread(absolute)


class _StubText:
    dim = 16

    def __call__(self, prompts):
        g = torch.Generator().manual_seed(len(prompts[0]))
        return torch.randn(len(prompts), 5, 16, generator=g), torch.ones(len(prompts), 5, dtype=torch.bool)


def test_sampler_holds_the_given_first_frame():
    from vgen.models.autoencoder import PatchAutoencoder
    from vgen.sample import generate

    model, ae = tiny_dit(cond_channels=1), PatchAutoencoder((1, 2, 2))
    first = torch.rand(2, 3, 1, 8, 8) * 2 - 1
    videos = generate(model, _StubText(), ae, ["a red circle moving left", "a blue square moving up"], (12, 4, 4, 4),
                      steps=3, guidance=3.0, first_frames=ae.encode(first))
    assert videos.shape == (2, 3, 4, 8, 8)
    assert torch.equal(videos[:, :, :1], first)
    free = generate(model, _StubText(), ae, ["a red circle moving left"], (12, 4, 4, 4), steps=3, guidance=3.0)
    assert (free[0, :, 1:] - videos[0, :, 1:]).abs().max() > 1e-3  # the condition reaches the other frames
