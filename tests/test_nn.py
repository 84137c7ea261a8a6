"""pygen.nn.GaussianReparameterize: splitting, modes, gradients, and a VAE that learns."""

import pytest
import torch
from torch import nn

import pygen
from pygen.nn import GaussianReparameterize
from pygen.ops import gaussian_kl_ref

from backends_under_test import BACKEND_DEVICES


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=lambda x: str(x))
def test_split_input_equals_two_inputs(backend, device):
    layer = GaussianReparameterize(backend=backend)
    h = torch.randn(6, 2 * 5, 3, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    z, kl = layer(h, generator=g)
    g.manual_seed(0)
    z2, kl2 = layer(h[:, :5], h[:, 5:], generator=g)
    assert z.shape == (6, 5, 3) and kl.shape == (6,)
    assert torch.equal(z, z2) and torch.equal(kl, kl2)
    torch.testing.assert_close(kl, gaussian_kl_ref(h[:, :5], h[:, 5:]), rtol=1e-5, atol=1e-5)


def test_deterministic_mode_returns_the_mean():
    layer = GaussianReparameterize(sample_in_eval=False).eval()
    mu, lv = torch.randn(4, 3), torch.randn(4, 3)
    z, kl = layer(mu, lv)
    assert torch.equal(z, mu)
    z, _ = layer(mu, lv, deterministic=False)
    assert not torch.equal(z, mu)
    layer.train()
    assert not torch.equal(layer(mu, lv).z, mu)


def test_logvar_range_and_errors():
    layer = GaussianReparameterize(logvar_range=(-2.0, 2.0))
    mu, lv = torch.zeros(2, 3), torch.full((2, 3), 50.0)
    _, kl = layer(mu, lv)
    torch.testing.assert_close(kl, gaussian_kl_ref(mu, lv.clamp(-2, 2)))
    with pytest.raises(ValueError, match="even size"):
        GaussianReparameterize()(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="expected a tensor"):
        GaussianReparameterize()([1.0, 2.0])


def test_vae_learns_on_a_toy_problem():
    """A small VAE on 2-D data on a line: loss falls, and KL stays finite (no blow-up)."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 4))
    dec = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2))
    sample = GaussianReparameterize()
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-2)
    t = torch.rand(512, 1) * 4 - 2
    x = torch.cat([t, 0.5 * t], dim=1)
    losses = []
    for _ in range(150):
        z, kl = sample(enc(x))
        recon = ((dec(z) - x) ** 2).sum(1)
        loss = (recon + 0.1 * kl).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    assert all(torch.isfinite(torch.tensor(losses)))


def test_module_is_exported():
    assert pygen.nn.GaussianReparameterize is GaussianReparameterize
    assert "backend" in repr(GaussianReparameterize(backend="torch"))
