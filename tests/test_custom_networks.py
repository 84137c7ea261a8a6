"""Users' own networks inside the families (pygen.models.custom): specs, the arguments a
constructor gets, refusals, and a save/load round trip of each family that rebuilds them."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from pygen.models import GAN, VAE, Diffusion, load
from pygen.models.custom import build_network, normalize_spec

pytestmark = pytest.mark.usefixtures("one_thread")

USER_MODULE = textwrap.dedent('''
    import torch
    from torch import nn

    class Denoiser(nn.Module):
        def __init__(self, shape, num_classes=None, width=8):
            super().__init__()
            self.got = {"shape": tuple(shape), "num_classes": num_classes, "width": width}
            self.net = nn.Conv2d(shape[0] + 1, shape[0], 3, padding=1)

        def forward(self, x, c_noise, labels=None, cond=None, aug_level=None):
            level = c_noise.float()[:, None, None, None].expand(-1, 1, *x.shape[2:])
            return self.net(torch.cat([x, level], 1))

    class Generator(nn.Module):
        def __init__(self, z_dim, shape):
            super().__init__()
            self.shape = tuple(shape)
            self.lin = nn.Linear(z_dim, int(torch.tensor(shape).prod()))

        def forward(self, z, labels=None):
            return torch.sigmoid(self.lin(z)).reshape(-1, *self.shape)

    class Critic(nn.Module):
        def __init__(self, shape, hidden=16):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(shape).prod()), hidden), nn.SiLU(),
                                     nn.Linear(hidden, 1))

        def forward(self, x, labels=None):
            return self.net(x).squeeze(1)

    class Encoder(nn.Module):
        def __init__(self, shape, latent_dim):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(shape).prod()), 2 * latent_dim))

        def forward(self, x):
            return self.net(x)

    class Decoder(nn.Module):
        def __init__(self, latent_dim, shape, **kwargs):
            super().__init__()
            self.kwargs = kwargs
            self.lin = nn.Linear(latent_dim, int(torch.tensor(shape).prod()))

        def forward(self, z):
            return self.lin(z)

    def not_a_module(**kwargs):
        raise AssertionError("must never be called")

    class Zoo:
        class Inner(nn.Module):
            def __init__(self, width=3):
                super().__init__()
                self.width = width
''')


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_nets_mod.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_nets_mod"
    sys.modules.pop("user_nets_mod", None)


def test_specs_normalise_and_bad_ones_name_the_role():
    assert normalize_spec("a.b:C", "net") == {"target": "a.b:C", "kwargs": {}}
    assert normalize_spec({"target": "a:C", "kwargs": {"w": 1}}, "net") == {"target": "a:C", "kwargs": {"w": 1}}
    for bad in ("a.b.C", ":C", "a:", 3, {"target": "a:C", "extra": 1}, {"kwargs": {}}):
        with pytest.raises(ValueError, match="^net"):
            normalize_spec(bad, "net")
    with pytest.raises(ValueError, match="decoder: kwargs must be a JSON object"):
        normalize_spec({"target": "a:C", "kwargs": [1]}, "decoder")


def test_build_passes_known_arguments_it_takes_and_refuses_non_modules(user_module):
    net = build_network(f"{user_module}:Denoiser", "net", shape=(1, 8, 8), num_classes=3, unused=1)
    assert net.got == {"shape": (1, 8, 8), "num_classes": 3, "width": 8}
    net = build_network({"target": f"{user_module}:Denoiser", "kwargs": {"width": 4, "num_classes": None}}, "net",
                        shape=(1, 8, 8), num_classes=3)  # fmt: skip
    assert net.got == {"shape": (1, 8, 8), "num_classes": None, "width": 4}  # the spec's kwargs win
    assert build_network(f"{user_module}:Decoder", "decoder", latent_dim=2, shape=(4,), extra=1).kwargs == {}
    with pytest.raises(ValueError, match="not an nn.Module class"):
        build_network(f"{user_module}:not_a_module", "net")
    with pytest.raises(ValueError, match="not an nn.Module class"):
        build_network("os:system", "net")
    with pytest.raises(ValueError, match="has no 'Missing'"):
        build_network(f"{user_module}:Missing", "net")
    with pytest.raises(ValueError, match="cannot import 'no_such_module_xyz'.*PYTHONPATH"):
        build_network("no_such_module_xyz:Net", "net")
    with pytest.raises(ValueError, match=r"Denoiser\(\*\*\{'depth': 2\}\) failed"):
        build_network({"target": f"{user_module}:Denoiser", "kwargs": {"depth": 2}}, "net", shape=(1, 8, 8))


def test_nested_classes_resolve_and_every_refusal_names_the_role(user_module):
    assert build_network({"target": f"{user_module}:Zoo.Inner", "kwargs": {"width": 5}}, "prior").width == 5
    with pytest.raises(ValueError, match=rf"^prior: module '{user_module}' has no 'Zoo.Missing'$"):
        build_network(f"{user_module}:Zoo.Missing", "prior")
    with pytest.raises(ValueError, match=r"^prior: target must be 'package.module:Class', got 'a:'$"):
        normalize_spec("a:", "prior")
    with pytest.raises(ValueError, match=r"^prior must be 'package.module:Class' or \{'target'.*got 3$"):
        normalize_spec(3, "prior")
    with pytest.raises(ValueError, match=r"^prior: 'os:system' is not an nn.Module class$"):
        build_network("os:system", "prior")
    with pytest.raises(ValueError, match=r"^prior: cannot import 'no_such_module_xyz' for 'no_such_module_xyz:N'"):
        build_network("no_such_module_xyz:N", "prior")


def _roundtrip(model, tmp_path):
    model.save(tmp_path / "m.pt")
    again = load(tmp_path / "m.pt")
    for name, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], v), name
    return again


def test_each_family_trains_saves_and_loads_user_networks(user_module, tmp_path):
    from pygen.train import fit

    x = torch.rand(64, 1, 8, 8)
    torch.manual_seed(0)
    d = Diffusion((1, 8, 8), net={"target": f"{user_module}:Denoiser", "kwargs": {"width": 4}})
    assert type(d.net).__name__ == "Denoiser" and d.config["net"]["kwargs"] == {"width": 4}
    fit(d, x, steps=2, batch_size=16, progress=False)
    assert _roundtrip(d, tmp_path).sample(2, seed=0, steps=3).shape == (2, 1, 8, 8)

    gan = GAN((1, 8, 8), z_dim=4, generator=f"{user_module}:Generator", discriminator=f"{user_module}:Critic")
    assert type(gan.generator).__name__ == "Generator" and type(gan.g_ema).__name__ == "Generator"
    fit(gan, x, steps=2, batch_size=16, progress=False)
    g = _roundtrip(gan, tmp_path)
    assert torch.equal(g.sample(3, seed=1), gan.sample(3, seed=1))

    vae = VAE((1, 8, 8), 2, encoder=f"{user_module}:Encoder", decoder=f"{user_module}:Decoder")
    fit(vae, x, steps=2, batch_size=16, progress=False)
    v = _roundtrip(vae, tmp_path)
    assert torch.equal(v.sample(3, seed=1), vae.sample(3, seed=1)) and v.config["encoder"]["target"].endswith("Encoder")

    # the module gone: load says which one, and why
    sys.modules.pop(user_module)
    sys.path.remove(str(tmp_path))
    with pytest.raises(ValueError, match=f"cannot import '{user_module}'"):
        load(tmp_path / "m.pt")


def test_a_conditional_diffusion_passes_num_classes_to_the_users_network(user_module):
    net = Diffusion((1, 8, 8), num_classes=3, net=f"{user_module}:Denoiser").net
    assert net.got == {"shape": (1, 8, 8), "num_classes": 3, "width": 8}
