"""Every family on any image shape (issue 18, item 3): non-square, not a power of two, C in
{1, 3, 4}. Each model builds, trains 2 steps, samples the data's exact shape, saves and loads
to the same samples. The padding helpers are checked exactly, and a padded network must not
let the padding leak into what it computes for the real pixels' shape."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pygen.models import GAN, VAE, Colorization, Diffusion, Flow, LatentDiffusion, SuperResolution, load
from pygen.models.networks import ConvDecoder, ConvEncoder, conv_plan, crop_from, pad_to, padding_for
from pygen.train import fit

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(1, 28, 28), (3, 32, 32), (3, 24, 40), (1, 17, 17), (4, 9, 12)]


def _images(shape: tuple[int, ...], n: int = 16, seed: int = 0) -> torch.Tensor:
    """8-bit images k / 255 (what a flow with 256 bins expects)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g).float() / 255


def _models(shape: tuple[int, ...]) -> dict[str, torch.nn.Module]:
    tiny = {"width": 8, "mults": [1, 2], "blocks": 1, "attention": True, "ema_decay": None}
    models = {
        "vae-conv": VAE(shape, latent_dim=4, network="conv", width=8),
        "vae-mlp": VAE(shape, latent_dim=4, network="mlp", hidden=32),
        "gan": GAN(shape, z_dim=8, g_width=8, d_width=8, diffaugment=True),
        "glow": Flow("glow", shape, bins=256, levels=2, depth=1, hidden=8),
        "realnvp": Flow("realnvp", shape, bins=256, hidden=16, n_layers=2),
        "diffusion": Diffusion(shape, **tiny),
        "sr": SuperResolution(shape, scale=4, **tiny),
        "latent": LatentDiffusion(shape, ae_steps=1, ae_width=4, **tiny),  # both stages in 2 steps
    }
    if shape[0] == 3:
        models["colorize"] = Colorization(shape, **tiny)
    return models


def _cond(name: str, model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    if name == "sr":
        return {"low_res": model.downsample(x)}
    if name == "colorize":
        return {"gray": x.mean(1, keepdim=True)}
    return {}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_every_family_trains_samples_saves_and_loads(shape, tmp_path):
    x = _images(shape)
    for name, model in _models(shape).items():
        fit(model, x, steps=2, batch_size=8, progress=False)
        cond = _cond(name, model, x[:3])
        extra = {"steps": 2} if isinstance(model, (Diffusion, LatentDiffusion)) else {}
        s = model.sample(3, seed=5, **cond, **extra)
        assert s.shape == (3, *shape), name
        assert torch.isfinite(s).all(), name
        assert 0 <= s.min() and s.max() <= 1, name  # images stay in the data's range
        model.save(tmp_path / f"{name}.pt")
        again = load(tmp_path / f"{name}.pt")
        assert torch.equal(again.sample(3, seed=5, **cond, **extra), s), name


@pytest.mark.parametrize("h,w", [(4, 4), (8, 8), (28, 28), (17, 17), (24, 40), (31, 9), (64, 64), (5, 100)])
def test_conv_plan_pads_the_least_and_stops_at_four(h, w):
    p = conv_plan(h, w)
    f = 2**p.levels
    left, right, top, bottom = p.pad
    assert p.padded == (h + top + bottom, w + left + right)
    assert p.padded[0] % f == 0 and p.padded[1] % f == 0
    assert 0 <= top + bottom < f and 0 <= left + right < f  # the next multiple, no further
    assert top <= bottom <= top + 1 and left <= right <= left + 1  # centred
    assert p.bottom == (p.padded[0] // f, p.padded[1] // f)
    assert 4 <= min(p.bottom) < 8  # halve while the short side stays >= 4
    if h == w and h & (h - 1) == 0:  # a power-of-two square: the plain DCGAN stack, no padding
        assert p.pad == (0, 0, 0, 0) and p.bottom == (4, 4)


def test_conv_plan_refuses_tiny_images():
    with pytest.raises(ValueError, match="at least 4x4, got 3x9"):
        conv_plan(3, 9)


def test_pad_and_crop_are_inverse_and_zero_filled():
    x = torch.randn(2, 3, 17, 23)
    pad = padding_for(17, 23, 8)
    assert pad == (0, 1, 3, 4)  # 23 -> 24 (one after), 17 -> 24 (three before, four after)
    y = pad_to(x, pad)
    assert y.shape == (2, 3, 24, 24)
    assert torch.equal(crop_from(y, pad), x)
    mask = torch.ones(24, 24, dtype=torch.bool)
    mask[3:20, 0:23] = False
    assert (y[..., mask] == 0).all()
    assert pad_to(x, (0, 0, 0, 0)) is x and crop_from(x, (0, 0, 0, 0)) is x


def test_power_of_two_networks_keep_their_parameter_shapes():
    # checkpoints saved before any-shape support must still load: same parameters at 8x8/32x32
    for size, bottom in ((8, 4), (32, 4)):
        enc, dec = ConvEncoder((1, size, size), 10, width=8), ConvDecoder(10, (1, size, size), width=8)
        levels = int(math.log2(size)) - 2
        assert enc.head.in_features == 8 * 2**levels * bottom * bottom
        assert dec.head.out_features == 8 * 2**levels * bottom * bottom


def test_padded_decoder_output_is_the_crop_of_its_padded_output():
    torch.manual_seed(0)
    dec = ConvDecoder(6, (2, 17, 13), width=8)
    z = torch.randn(3, 6)
    full = dec.body(dec.head(z).view(3, dec.ch, *dec.plan.bottom))
    assert dec.plan.levels == 1 and full.shape[-2:] == dec.plan.padded == (18, 14)  # 13 // 4 = 3: one halving
    left, right, top, bottom = dec.plan.pad
    assert (left, right, top, bottom) == (0, 1, 0, 1)
    assert torch.equal(dec(z), full[..., :17, :13])


def test_padded_encoder_sees_zeros_around_the_image():
    torch.manual_seed(0)
    enc = ConvEncoder((1, 17, 13), 5, width=8)
    x = torch.rand(2, 1, 17, 13)
    assert torch.equal(enc(x), enc.head(enc.features(F.pad(x, enc.plan.pad)).flatten(1)))


def test_unet_pads_any_shape_and_matches_the_padded_computation():
    torch.manual_seed(0)
    d = Diffusion((3, 17, 10), width=8, mults=[1, 2, 2], blocks=1)
    for p in d.net.parameters():  # zero-initialised outputs would hide the padding
        torch.nn.init.normal_(p, std=0.1)
    x, c = torch.randn(2, 3, 17, 10), torch.rand(2)
    out = d.net(x, c)
    assert out.shape == x.shape
    pad = padding_for(17, 10, 4)
    assert pad == (1, 1, 1, 2)
    assert torch.allclose(out, crop_from(d.net(F.pad(x, pad), c), pad), atol=1e-6)


def test_glow_augmentation_pixels_and_bound():
    torch.manual_seed(0)
    f = Flow("glow", (1, 17, 17), bins=256, levels=2, depth=1, hidden=8)
    assert f.pad == (1, 2, 1, 2) and f.flow.shape == (1, 20, 20)
    x = _images((1, 17, 17), n=4)
    y = f._to_flow(x, seed=3)
    assert torch.equal(crop_from(y, f.pad), x)
    border = torch.ones(20, 20, dtype=torch.bool)
    border[1:18, 1:18] = False
    u = y[..., border]
    assert (u >= 0).all() and (u < 1).all() and u.std() > 0.2  # U[0, 1) noise, not zeros
    # seeded: example i's pixels depend on (seed, offset + i) only
    assert torch.equal(f._to_flow(x[2:], seed=3, offset=2), y[2:])
    assert not torch.equal(f._to_flow(x, seed=4), y)
    lp = f.log_prob(x, seed=3)
    assert torch.equal(f.log_prob(x[1:3], seed=3, offset=1), lp[1:3])
    # bits/dim count the data's 289 dimensions, not the padded 400
    out = f.loss(x)
    assert torch.allclose(out["bpd"], out["loss"] / (289 * math.log(2)))


def test_flow_defaults_to_glow_for_every_image_shape():
    from pygen.data import Data

    for shape in SHAPES:
        data = Data(_images(shape, n=4), None, "x")
        assert Flow.data_defaults(data)["kind"] == "glow"


def test_sr_any_scale_block_means_and_projection_exact():
    torch.manual_seed(0)
    sr = SuperResolution((1, 17, 10), scale=4, width=8, mults=[1], blocks=1, ema_decay=None)
    assert sr.low_res_shape == (1, 5, 3)
    hr = torch.rand(2, 1, 17, 10)
    lr = sr.downsample(hr)
    assert torch.allclose(lr[..., 4, 2], hr[..., 16:, 8:].mean((-1, -2)))  # a partial corner block
    assert torch.allclose(lr[..., 1, 0], hr[..., 4:8, 0:4].mean((-1, -2)))
    target = torch.rand(2, 1, 5, 3) * 0.2 + 0.4
    proj = sr.project(hr * 0.2 + 0.4, target)  # stays inside [0, 1]: the projection is exact
    assert torch.allclose(sr.downsample(proj), target, atol=1e-6)
    assert sr.upsample(lr).shape == hr.shape
    with pytest.raises(ValueError, match="scale must be an int in"):
        SuperResolution((1, 8, 8), scale=9)
