"""pygen.models.gan: loss terms against direct computations, the alternation (frozen
networks, n_dis), spectral norm, DiffAugment, counter-based sampling, save/load, divergence
and a short training run on 2-D data."""

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import pygen.data
from pygen.metrics import mmd
from pygen.models import load
from pygen.models.labels import sample_labels
from pygen.models.update import Update
from pygen.models.gan import (
    GAN,
    LOSSES,
    diff_augment,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
    r1_penalty,
)
from pygen.train import TrainingDiverged, fit


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


def image_gan(**kw) -> GAN:
    torch.manual_seed(0)
    kw = {"z_dim": 8, "g_width": 8, "d_width": 8, **kw}
    return GAN((1, 8, 8), **kw)


def point_gan(**kw) -> GAN:
    torch.manual_seed(0)
    kw = {"z_dim": 4, "g_hidden": 16, "d_hidden": 16, **kw}
    return GAN((2,), **kw)


def digits_batch(n: int = 16) -> torch.Tensor:
    return pygen.data.digits("train")[0][:n]


# ---- loss terms -----------------------------------------------------------------------------


def test_adversarial_losses_match_their_definitions():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(32, generator=g, dtype=torch.float64), torch.randn(32, generator=g, dtype=torch.float64)
    p_real, p_fake = torch.sigmoid(real), torch.sigmoid(fake)
    # non-saturating: D maximises log D(x) + log(1 - D(G(z))); G maximises log D(G(z))
    want = -(torch.log(p_real).mean() + torch.log(1 - p_fake).mean())
    torch.testing.assert_close(discriminator_loss("ns", real, fake), want)
    torch.testing.assert_close(generator_loss("ns", fake), -torch.log(p_fake).mean())
    want = torch.clamp(1 - real, min=0).mean() + torch.clamp(1 + fake, min=0).mean()
    torch.testing.assert_close(discriminator_loss("hinge", real, fake), want)
    torch.testing.assert_close(generator_loss("hinge", fake), -fake.mean())
    torch.testing.assert_close(discriminator_loss("wgan-gp", real, fake), fake.mean() - real.mean())
    torch.testing.assert_close(generator_loss("wgan-gp", fake), -fake.mean())
    with pytest.raises(ValueError, match="loss must be one of"):
        discriminator_loss("lsgan", real, fake)


def _per_example_grads(d, x: torch.Tensor) -> torch.Tensor:
    """grad_x D(x_i) one example at a time (no batching): the direct computation."""
    out = []
    for xi in x:
        xi = xi.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(d(xi[None]).sum(), xi)
        out.append(g)
    return torch.stack(out)


def test_r1_and_gradient_penalty_on_a_linear_critic_are_closed_form():
    """D(x) = w.x + b: grad_x D = w everywhere, so R1 = ||w||^2 and GP = (||w|| - 1)^2, and
    their gradients in w (through create_graph=True) are 2w and 2(||w|| - 1) w / ||w||."""
    torch.manual_seed(0)
    lin = nn.Linear(5, 1).double()
    d = lambda x: lin(x).squeeze(1)  # noqa: E731
    x, fake = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 5, dtype=torch.float64)
    w = lin.weight.squeeze(0)
    r1, logits = r1_penalty(d, x)
    torch.testing.assert_close(r1, w.pow(2).sum())
    torch.testing.assert_close(logits, d(x))
    (gw,) = torch.autograd.grad(r1, lin.weight)
    torch.testing.assert_close(gw.squeeze(0), 2 * w)
    gp = gradient_penalty(d, x, fake)
    torch.testing.assert_close(gp, (w.norm() - 1) ** 2)
    (gw,) = torch.autograd.grad(gp, lin.weight)
    torch.testing.assert_close(gw.squeeze(0), 2 * (w.norm() - 1) * w / w.norm())


def test_gradient_penalties_match_per_example_autograd_on_a_conv_critic():
    gan = image_gan().eval()  # eval: spectral norm's power iteration does not move between the calls
    d = lambda x: gan.discriminator(x)  # noqa: E731
    x = digits_batch(8)
    fake = torch.rand(8, 1, 8, 8)
    r1, _ = r1_penalty(d, x)
    want = _per_example_grads(d, x).pow(2).flatten(1).sum(1).mean()
    torch.testing.assert_close(r1, want, rtol=1e-4, atol=1e-6)
    gp = gradient_penalty(d, x, fake, generator=torch.Generator().manual_seed(3))
    e = torch.rand(8, 1, 1, 1, generator=torch.Generator().manual_seed(3))
    x_hat = e * x + (1 - e) * fake
    want = (_per_example_grads(d, x_hat).flatten(1).norm(dim=1) - 1).pow(2).mean()
    torch.testing.assert_close(gp, want, rtol=1e-4, atol=1e-6)
    # both are differentiable in D's weights (double backward)
    for pen in (r1, gp):
        grads = torch.autograd.grad(pen, [p for p in gan.discriminator.parameters()], allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("kind", LOSSES)
def test_model_loss_terms_are_the_direct_computation(kind):
    """model.loss(phase=...) recomputed by hand from the same draws: z first (torch's RNG),
    then the gradient penalty's interpolation weights. R1 is lazy: on D steps that are a
    multiple of r1_every only, weighted by gamma / 2 * r1_every."""
    gan = image_gan(loss=kind, r1_gamma=0.5, r1_every=4).eval()  # eval: fixed spectral-norm vectors
    x = digits_batch(8)
    torch.manual_seed(1)
    terms = gan.loss(x, phase="d", d_step=8)
    torch.manual_seed(1)
    z = torch.randn(8, gan.z_dim)
    fake = gan.generator(z)
    d = lambda v: gan.discriminator(v)  # noqa: E731
    real_logits, fake_logits = d(x), d(fake)
    adv = discriminator_loss(kind, real_logits, fake_logits)
    want = adv + 0.5 / 2 * 4 * _per_example_grads(d, x).pow(2).flatten(1).sum(1).mean()
    if kind == "wgan-gp":
        e = torch.rand(8, 1, 1, 1)
        x_hat = e * x + (1 - e) * fake.detach()
        want = want + 10.0 * (_per_example_grads(d, x_hat).flatten(1).norm(dim=1) - 1).pow(2).mean()
    torch.testing.assert_close(terms["loss_d"], adv.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss"].detach(), want.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["d_real"], real_logits.mean().detach())
    torch.testing.assert_close(terms["d_fake"], fake_logits.mean().detach())
    # not a multiple of r1_every: no R1 in the loss ("r1" still logs the last value)
    torch.manual_seed(1)
    terms = gan.loss(x, phase="d", d_step=9)
    no_r1 = want - 0.5 / 2 * 4 * _per_example_grads(d, x).pow(2).flatten(1).sum(1).mean()
    torch.testing.assert_close(terms["loss"].detach(), no_r1.detach(), rtol=1e-4, atol=1e-6)
    # G's loss
    torch.manual_seed(2)
    terms = gan.loss(x, phase="g")
    torch.manual_seed(2)
    torch.testing.assert_close(terms["loss"], generator_loss(kind, d(gan.generator(torch.randn(8, gan.z_dim)))))


# ---- the alternation -----------------------------------------------------------------------------


def _grads(net: nn.Module) -> list:
    return [p.grad for p in net.parameters()]


def test_frozen_network_gets_no_gradient_and_flags_are_restored():
    gan = image_gan(r1_gamma=1.0, r1_every=1, diffaugment=True)
    opt_d, opt_g = gan.configure_optimizers()
    x = digits_batch(8)
    seen = []

    def forward(batch, **kw):  # what each phase sees inside the trainer's forward
        seen.append((kw["phase"], {p.requires_grad for p in gan.generator.parameters()},
                     {p.requires_grad for p in gan.discriminator.parameters()}))
        return gan(batch, **kw)

    gan.generator_step(x, 0, opt_g, update=Update(forward))  # G's grads exist before the D phase
    gan.discriminator_step(x, 1, opt_d, update=Update(forward))
    assert all(g is None for g in _grads(gan.generator))
    assert all(g is not None for g in _grads(gan.discriminator))  # (hinge: the head's bias grad can be 0)
    assert sum(g.abs().sum() for g in _grads(gan.discriminator)) > 0
    gan.generator_step(x, 1, opt_g, update=Update(forward))
    assert all(g is None for g in _grads(gan.discriminator))
    assert all(g is not None for g in _grads(gan.generator))
    assert seen[1:] == [("d", {False}, {True}), ("g", {True}, {False})]
    assert all(p.requires_grad for p in gan.generator.parameters())
    assert all(p.requires_grad for p in gan.discriminator.parameters())
    assert all(not p.requires_grad for p in gan.g_ema.parameters())
    # a parameter frozen by the user stays frozen
    first = next(gan.generator.parameters())
    first.requires_grad_(False)
    gan.training_step(x, 2, [opt_d, opt_g])
    assert not first.requires_grad and first.grad is None
    assert all(p.requires_grad for p in list(gan.generator.parameters())[1:])


def test_n_dis_discriminator_steps_per_generator_step():
    gan = image_gan(n_dis=3, r1_gamma=1.0, r1_every=2)
    opts = gan.configure_optimizers()
    calls = []

    def forward(batch, **kw):
        calls.append((kw["phase"], kw.get("d_step")))
        return gan(batch, **kw)

    x = digits_batch(8)
    for step in range(2):
        out = gan.training_step(x, step, opts, update=Update(forward))
    assert calls == [("d", 0), ("d", 1), ("d", 2), ("g", None), ("d", 3), ("d", 4), ("d", 5), ("g", None)]
    assert opts[0].state[next(gan.discriminator.parameters())]["step"] == 6
    assert opts[1].state[next(gan.generator.parameters())]["step"] == 2
    for key in ("loss", "loss_d", "loss_g", "d_real", "d_fake", "grad_norm_d", "grad_norm_g", "r1"):
        assert torch.isfinite(out[key]), key


def test_the_logged_lr_is_the_generator_s_under_ttur():
    """D steps at lr x lr_ratio, then G at lr: the trainer logs G's, the --lr the user gave."""
    hist = fit(image_gan(lr_ratio=4.0), digits_batch(16), steps=2, batch_size=8, lr=3e-4, log_every=1,
               progress=False, seed=0)
    assert [r["lr"] for r in hist] == [3e-4, 3e-4]


def test_labelled_images_of_28x28_and_up_train_class_conditional_by_default():
    """for_data: labelled large examples (measured on Fashion-MNIST) get the projection GAN;
    small ones (the digits), unlabelled data and ``unconditional`` the unconditional one."""
    from types import SimpleNamespace

    def data(*shape, labels=True):
        return SimpleNamespace(shape=shape, labels=torch.arange(10) if labels else None, kind="image", bins=256)

    kw = {"g_width": 8, "d_width": 8}
    assert GAN.for_data(data(1, 28, 28), **kw).num_classes == 10
    assert GAN.for_data(data(3, 16, 16), **kw).num_classes == 10  # 768 values: large
    assert GAN.for_data(data(1, 15, 17), **kw).num_classes is None  # 255 values: the digits' rule
    assert GAN.for_data(data(1, 28, 28, labels=False), **kw).num_classes is None
    assert GAN.for_data(data(1, 28, 28), unconditional=True, **kw).num_classes is None
    assert GAN.for_data(data(1, 8, 8), conditional=True, **kw).num_classes == 10
    assert GAN.for_data(data(1, 28, 28), num_classes=12, **kw).num_classes == 12  # options win
    with pytest.raises(ValueError, match="conditional and unconditional"):
        GAN.for_data(data(1, 28, 28), conditional=True, unconditional=True)
    with pytest.raises(ValueError, match="labels"):
        GAN.for_data(data(1, 8, 8, labels=False), conditional=True)


def test_spectral_norm_on_every_discriminator_weight():
    for gan in (image_gan(), point_gan(), image_gan(num_classes=10)):
        layers = [m for m in gan.discriminator.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]
        assert len(layers) >= 2
        for m in layers:
            assert parametrize.is_parametrized(m, "weight")
            assert type(m.parametrizations.weight[0]).__name__ == "_SpectralNorm"
        assert not any(parametrize.is_parametrized(m) for m in gan.generator.modules())
    gan = image_gan(spectral_norm=False)
    assert not any(parametrize.is_parametrized(m) for m in gan.discriminator.modules())
    # the discriminator is the shared encoder without normalisation, with leaky ReLUs
    acts = [m for m in image_gan().discriminator.modules() if isinstance(m, nn.LeakyReLU)]
    assert acts and all(m.negative_slope == 0.2 for m in acts)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in image_gan().discriminator.modules())


# ---- DiffAugment ----------------------------------------------------------------------------------


def test_diffaugment_preserves_shape_and_is_differentiable():
    x = torch.rand(6, 3, 8, 8, dtype=torch.float64, requires_grad=True)

    def aug(v):  # the same random draws at every call
        return diff_augment(v, generator=torch.Generator().manual_seed(0))

    y = aug(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.autograd.gradcheck(aug, (x,))
    # a shift and a mask: every output pixel is an input pixel or 0, and ~1/4 of each image is cut
    ones = aug(torch.ones(6, 3, 8, 8, dtype=torch.float64))
    assert set(ones.unique().tolist()) <= {0.0, 1.0}
    zeros = (ones[:, 0] == 0).flatten(1).sum(1)
    assert (zeros >= 4).all() and (zeros <= 16 + 2 * 8 + 1).all()  # the cut square, clipped, + shifted-in border
    # translation alone moves content without changing it
    t = diff_augment(x, ("translation",), generator=torch.Generator().manual_seed(1)).detach()
    assert all(torch.isin(t[i].unique(), torch.cat([x[i].detach().flatten(), torch.zeros(1, dtype=x.dtype)])).all()
               for i in range(6))
    assert torch.equal(diff_augment(x, ("translation",), translation=0.0), x)
    # independent draws per image
    many = diff_augment(torch.ones(64, 1, 16, 16), generator=torch.Generator().manual_seed(2))
    assert len({tuple(m.flatten().tolist()) for m in many}) > 32
    with pytest.raises(ValueError, match="images"):
        diff_augment(torch.rand(4, 2))
    with pytest.raises(ValueError, match="diffaugment needs image data"):
        GAN((2,), diffaugment=True)


# ---- sampling, files -----------------------------------------------------------------------------


@pytest.mark.parametrize("make", [image_gan, point_gan, lambda: image_gan(num_classes=10, g_norm="group")])
def test_samples_depend_on_seed_and_index_only(make):
    gan = make()
    gan.train()  # sample() switches to eval itself
    opts = gan.configure_optimizers()
    batch = (digits_batch(8), torch.arange(8)) if gan.num_classes else (
        digits_batch(8) if len(gan.data_shape) == 3 else torch.randn(8, 2))
    for step in range(2):
        gan.training_step(batch, step, opts)  # batch-norm statistics and EMA are not the init
    full = gan.sample(10, seed=3)
    parts = torch.cat([gan.sample(4, seed=3), gan.sample(1, seed=3, offset=4), gan.sample(5, seed=3, offset=5)])
    torch.testing.assert_close(parts, full, atol=1e-5, rtol=0)
    assert full.shape == (10, *gan.data_shape)
    assert gan.training and gan.generator.training and not gan.g_ema.training
    assert not torch.allclose(gan.sample(10, seed=4), full)
    if len(gan.data_shape) == 3:
        assert full.min() >= 0 and full.max() <= 1
    # EMA generator by default; the raw one on request
    raw = gan.sample(10, seed=3, ema=False)
    assert not torch.allclose(raw, full)
    gan.g_ema.load_state_dict(gan.generator.state_dict())
    torch.testing.assert_close(gan.sample(10, seed=3), raw)


def test_conditional_sampling_labels():
    gan = image_gan(num_classes=10)
    assert gan.sample(5, seed=0, labels=torch.tensor([0, 1, 2, 3, 4])).shape == (5, 1, 8, 8)
    assert gan.sample(5, seed=0, labels=7).shape == (5, 1, 8, 8)
    # random labels: a function of (seed, index) too, drawn from a derived seed
    lab = sample_labels(None, 200, 10, seed=5, offset=0)
    torch.testing.assert_close(lab[50:], sample_labels(None, 150, 10, seed=5, offset=50))
    assert set(lab.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="conditional"):
        gan.loss(digits_batch(4))
    with pytest.raises(ValueError, match="unconditional"):
        image_gan().sample(2, seed=0, labels=1)


def test_save_load_round_trip(tmp_path):
    gan = image_gan(num_classes=10, diffaugment=True, r1_gamma=0.1)
    opts = gan.configure_optimizers()
    gan.training_step((digits_batch(8), torch.arange(8)), 0, opts)
    gan.save(tmp_path / "gan.pt")
    back = load(tmp_path / "gan.pt")
    assert type(back) is GAN and back.config == gan.config
    for ema in (True, False):
        torch.testing.assert_close(back.sample(6, seed=1, ema=ema), gan.sample(6, seed=1, ema=ema))
    # through a training run directory
    pts = pygen.data.toy2d("8gaussians", 256)
    gan = point_gan()
    fit(gan, pts, steps=3, batch_size=32, progress=False, out=tmp_path / "run")
    back = load(tmp_path / "run")
    torch.testing.assert_close(back.sample(6, seed=1), gan.sample(6, seed=1))


# ---- divergence -----------------------------------------------------------------------------------


def test_exploding_loss_raises_training_diverged():
    gan = image_gan()
    with torch.no_grad():
        gan.discriminator.net.head.bias.fill_(1e5)  # not spectral-normed: D's logits explode
    with pytest.raises(TrainingDiverged, match=r"step 4: \|loss_d\| = 1e\+05 > max_loss"):
        gan.training_step(digits_batch(8), 3, gan.configure_optimizers())


def test_nan_loss_propagates_to_the_trainer(tmp_path):
    gan = point_gan()
    with torch.no_grad():
        next(gan.generator.parameters()).fill_(math.nan)
    opts = gan.configure_optimizers()
    before = [p.clone() for p in gan.discriminator.parameters()]
    out = gan.training_step(torch.randn(8, 2), 0, opts)
    assert math.isnan(out["loss"])
    for p, q in zip(before, gan.discriminator.parameters()):  # no update from a NaN loss
        assert torch.equal(p, q)
    with pytest.raises(TrainingDiverged, match="non-finite loss terms .* at training step 1"):
        fit(gan, torch.randn(64, 2), steps=5, batch_size=16, progress=False)


# ---- learning ---------------------------------------------------------------------------------------


def test_training_on_8_gaussians_moves_samples_towards_the_data():
    data = pygen.data.toy2d("8gaussians", 4096)
    ref = pygen.data.toy2d("8gaussians", 1000, seed=1)
    gan = point_gan(z_dim=8, g_hidden=64, d_hidden=64, loss="ns", r1_gamma=0.1, ema_decay=0.99)
    before = mmd(ref, gan.sample(1000, seed=0))
    history = fit(gan, data, steps=600, batch_size=128, lr=1e-3, progress=False, log_every=100)
    after, after_raw = mmd(ref, gan.sample(1000, seed=0)), mmd(ref, gan.sample(1000, seed=0, ema=False))
    assert after < 0.1 * before and after_raw < 0.1 * before, (before, after, after_raw)
    for key in ("loss_d", "loss_g", "d_real", "d_fake", "grad_norm_d", "grad_norm_g", "r1"):
        assert key in history[-1]


GAN_DDP_SCRIPT = '''
import os, sys
import torch
from pygen.models import GAN
from pygen.train import fit
out, dump = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
x = torch.randn(256, 2) * 0.5 + 1.0
model = GAN((2,), z_dim=4, loss="hinge", n_dis=2, r1_gamma=0.1, r1_every=2, g_hidden=16, d_hidden=16)
hist = fit(model, x, steps=4, batch_size=32, lr=1e-3, out=out, log_every=1, checkpoint_every=2, progress=False)
torch.save({k: v for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k},
           os.path.join(dump, "rank" + os.environ["RANK"] + ".pt"))
'''


def test_torchrun_two_processes_train_a_gan(tmp_path):
    """The alternating D/G steps under DDP (gloo, 2 ranks): D and G phases leave the other
    network's parameters unused in each forward call, which DDP accepts only with
    find_unused_parameters (the model's ddp_find_unused_parameters). Both ranks end with the
    same weights and rank 0 writes the checkpoints."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    script = tmp_path / "ddp_gan.py"
    script.write_text(GAN_DDP_SCRIPT)
    out, dump = tmp_path / "out", tmp_path / "dump"
    dump.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", str(script),
           str(out), str(dump)]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name, v in r0.items():
        assert torch.equal(v, r1[name]), name
    assert (out / "latest").read_text().strip() == "ckpt-4.pt"
