"""Flow-matching math: interpolation, velocity target, timestep sampling, the Euler sampler, guidance."""

import torch

from vgen.diffusion.flow import (
    add_noise,
    configured_shift,
    euler_sample,
    flow_matching_loss,
    guided_velocity,
    sample_timesteps,
    shift_t,
    timestep_shift,
    velocity_target,
)


def test_interpolation_endpoints_and_velocity():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    assert torch.allclose(add_noise(x0, noise, torch.zeros(3)), x0)
    assert torch.allclose(add_noise(x0, noise, torch.ones(3)), noise)
    t, dt = torch.full((3,), 0.3), 1e-3
    numeric = (add_noise(x0, noise, t + dt) - add_noise(x0, noise, t - dt)) / (2 * dt)
    assert torch.allclose(numeric, velocity_target(x0, noise), atol=1e-3)


def test_loss_is_zero_for_the_true_velocity_and_mean_over_elements():
    x0, noise = torch.randn(2, 3), torch.randn(2, 3)
    assert flow_matching_loss(noise - x0, x0, noise) == 0
    assert torch.isclose(flow_matching_loss(noise - x0 + 2.0, x0, noise), torch.tensor(4.0))


def test_euler_sampler_reaches_the_data_point_of_a_known_field():
    # data distribution = a single point c: the exact velocity is (x - c) / t and every path is straight,
    # so Euler integration lands on c for any number of steps and any shift
    c = torch.tensor([[1.5, -2.0, 0.25]])
    noise = torch.randn(1, 3, generator=torch.Generator().manual_seed(0))
    for steps, shift in ((1, 1.0), (7, 1.0), (10, 3.0)):
        out = euler_sample(lambda x, t: (x - c) / t[:, None], noise, steps, shift)
        assert torch.allclose(out, c, atol=1e-5), (steps, shift)


def test_euler_sampler_gaussian_data():
    # data N(mu, s^2) per dimension: x_t ~ N((1-t) mu, (1-t)^2 s^2 + t^2); velocity field in closed form
    mu, s = 2.0, 0.5

    def v(x, t):
        t = t[:, None]
        var = (1 - t) ** 2 * s**2 + t**2
        x0_hat = mu + (1 - t) * s**2 / var * (x - (1 - t) * mu)
        return (x - x0_hat) / t

    noise = torch.randn(20000, 1, generator=torch.Generator().manual_seed(1))
    out = euler_sample(v, noise, 200, 1.0)
    assert abs(out.mean() - mu) < 0.02 and abs(out.std() - s) < 0.02


def test_timestep_sampling_logit_normal_and_shift():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(20000, g, shift=1.0)
    assert 0 < t.min() and t.max() < 1
    assert abs(t.median() - 0.5) < 0.02
    shifted = sample_timesteps(20000, torch.Generator().manual_seed(0), shift=3.0)
    assert abs(shifted.median() - float(shift_t(torch.tensor(0.5), 3.0))) < 0.02
    assert shifted.median() > t.median()


def test_shift_grows_with_tokens():
    assert timestep_shift(256) == 1.0
    assert timestep_shift(1024) == 2.0
    assert timestep_shift(4096) > timestep_shift(1024)
    assert timestep_shift(10**9, max_shift=6.0) == 6.0


def test_a_configured_shift_replaces_the_token_rule():
    import pytest
    from types import SimpleNamespace

    from vgen.config import ConfigError, load_config

    rule = SimpleNamespace(shift=None, shift_base_tokens=256, shift_max=6.0)
    assert configured_shift(1024, rule) == 2.0 and configured_shift(128, rule) == 1.0
    fixed = SimpleNamespace(shift=3.0, shift_base_tokens=256, shift_max=6.0)
    assert configured_shift(128, fixed) == 3.0 == configured_shift(10**6, fixed)
    with pytest.raises(ConfigError, match="diffusion.shift"):
        load_config(["diffusion.shift=0.0"])


def test_guidance_combines_conditional_and_unconditional():
    def model(x, t, text, mask):
        return x * 0 + text.mean(dim=(1, 2))[:, None]  # velocity = mean of its text embedding

    x, t = torch.zeros(2, 3), torch.ones(2)
    cond = (torch.full((2, 4, 5), 1.0), torch.ones(2, 4, dtype=torch.bool))
    uncond = (torch.full((2, 4, 5), 0.25), torch.ones(2, 4, dtype=torch.bool))
    assert torch.allclose(guided_velocity(model, x, t, cond, uncond, 1.0), torch.full((2, 3), 1.0))
    assert torch.allclose(guided_velocity(model, x, t, cond, uncond, 3.0), torch.full((2, 3), 0.25 + 3 * 0.75))
