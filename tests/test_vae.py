"""pygen.models.vae (VAE) and pygen.metrics.vae: loss terms against direct computations, the
remedies (free bits, KL warm-up, gamma), IWAE, the measurements, the second stage,
(seed, index)-pure sampling, save/load, and a short training."""

import math

import pytest
import torch

import pygen.models
from pygen.metrics import logmeanexp
from pygen.metrics.vae import (
    active_units,
    aggregate_posterior_mismatch,
    aggregate_posterior_samples,
    elbo_terms,
    gaussian_kl_to_prior,
    kl_per_dim,
    latent_report,
    variance_loss,
)
from pygen.models import load
from pygen.models.seeding import counter_uniform, derive_seed
from pygen.models.vae import VAE
from pygen.ops import reparameterize
from pygen.train import fit


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


def blobs(n: int, seed: int = 0, size: int = 8) -> torch.Tensor:
    """(n, 1, size, size) Gaussian blobs in [0, 1] at random places: image-like data."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.arange(size, dtype=torch.float32)
    c = 1 + (size - 2) * torch.rand(n, 2, generator=g)
    w = 0.8 + torch.rand(n, 1, 1, generator=g)
    d2 = (grid.view(1, size, 1) - c[:, 0].view(n, 1, 1)) ** 2 + (grid.view(1, 1, size) - c[:, 1].view(n, 1, 1)) ** 2
    return torch.exp(-d2 / (2 * w**2)).unsqueeze(1)


def tiny(**kw) -> VAE:
    torch.manual_seed(0)
    kw = {"width": 8, "hidden": 32, **kw}
    return VAE(kw.pop("data_shape", (1, 8, 8)), kw.pop("latent_dim", 4), **kw)


def same_z(model: VAE, x: torch.Tensor, seed: int, labels=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mu, logvar, z) with the z that model.loss draws after torch.manual_seed(seed)."""
    mu, logvar = model.encode(x, labels)
    torch.manual_seed(seed)
    return mu, logvar, reparameterize(mu, logvar)


def closed_form_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return 0.5 * (mu.double() ** 2 + logvar.double().exp() - 1 - logvar.double()).sum(1)


# ---- loss terms -----------------------------------------------------------------------------


def test_bernoulli_terms_match_direct_computation():
    m, x = tiny(), blobs(16)
    torch.manual_seed(5)
    terms = m.loss(x)
    mu, logvar, z = same_z(m, x, 5)
    p = torch.sigmoid(m.decoder_output(z)).double()
    bce = -(x * p.log() + (1 - x) * (1 - p).log()).flatten(1).sum(1)
    kl = closed_form_kl(mu, logvar)
    torch.testing.assert_close(terms["recon"].double(), bce.mean(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(terms["kl"].double(), kl.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss"].double(), (bce + kl).mean(), rtol=1e-5, atol=1e-4)
    assert float(terms["elbo"]) == pytest.approx(-float(terms["loss"].detach()), rel=1e-6)
    assert float(terms["beta"]) == 1.0 and float(terms["kl_weight"]) == 1.0
    assert set(terms) >= {"loss", "recon", "kl", "beta", "kl_weight", "mse"}
    with pytest.raises(ValueError, match=r"x in \[0, 1\]"):
        m.loss(x * 2)


@pytest.mark.parametrize("gamma", ["fixed", "learned", "running"])
def test_gaussian_nll_with_gamma_matches_normal_log_prob(gamma):
    m, x = tiny(likelihood="gaussian", gamma=gamma, gamma_init=0.3), blobs(16)
    m.eval()  # no running update here
    torch.manual_seed(2)
    terms = m.loss(x)
    mu, logvar, z = same_z(m, x, 2)
    mean = m.decode(z).detach()
    assert float(mean.min()) >= 0 and float(mean.max()) <= 1  # sigmoid mean for images
    nll = -torch.distributions.Normal(mean.double(), 0.3).log_prob(x.double()).flatten(1).sum(1)
    torch.testing.assert_close(terms["recon"].double(), nll.mean(), rtol=1e-5, atol=1e-3)
    assert float(terms["gamma"]) == pytest.approx(0.3, rel=1e-6)
    torch.testing.assert_close(terms["kl"].double(), closed_form_kl(mu, logvar).mean(), rtol=1e-5, atol=1e-6)
    # the vector variant: identity mean
    v = tiny(data_shape=(3,), likelihood="gaussian", gamma_init=2.0)
    xv = torch.randn(8, 3) * 5
    torch.manual_seed(1)
    tv = v.loss(xv)
    _, _, zv = same_z(v, xv, 1)
    nll = -torch.distributions.Normal(v.decoder_output(zv).double(), 2.0).log_prob(xv.double()).sum(1)
    torch.testing.assert_close(tv["recon"].double(), nll.mean(), rtol=1e-5, atol=1e-4)


def test_learned_gamma_gets_gradient_running_gamma_does_not():
    x = blobs(16)
    learned = tiny(likelihood="gaussian", gamma="learned", gamma_init=0.5)
    torch.manual_seed(0)
    learned.loss(x)["loss"].backward()
    # d/dlog_gamma of the NLL: D - ||x - m||^2 / gamma^2, averaged over the batch
    _, _, z = same_z(learned, x, 0)
    sq = (x - learned.decode(z)).pow(2).flatten(1).sum(1)
    want = (64 - sq / 0.25).mean()
    torch.testing.assert_close(learned.log_gamma.grad, want.detach(), rtol=1e-4, atol=1e-4)
    running = tiny(likelihood="gaussian", gamma="running")
    assert not running.running_mse.requires_grad and "running_mse" in running.state_dict()
    assert all("gamma" not in n for n, _ in running.named_parameters())


def test_running_gamma_update_rule():
    m, x = tiny(likelihood="gaussian", gamma="running", gamma_init=1.0), blobs(16)
    m.train()
    before = float(m.running_mse)
    terms = m.loss(x)  # the batch uses the gamma from before its update
    assert float(terms["gamma"]) == pytest.approx(math.sqrt(before))
    mse = float(terms["mse"])
    assert float(m.running_mse) == pytest.approx(min(before, 0.99 * before + 0.01 * mse), rel=1e-6)
    # the min: a batch worse than the running value does not raise it
    m.running_mse.fill_(mse / 10)
    m.loss(x)
    assert float(m.running_mse) == pytest.approx(mse / 10, rel=1e-6)
    # an explicit update, and none in eval mode
    m.running_mse.fill_(0.5)
    m.update_running_mse(0.1)
    assert float(m.running_mse) == pytest.approx(min(0.5, 0.99 * 0.5 + 0.001))
    m.eval()
    m.loss(x)
    assert float(m.running_mse) == pytest.approx(min(0.5, 0.99 * 0.5 + 0.001))
    # mse is the per-pixel mean over the batch of the decoded mean's squared error
    torch.manual_seed(0)
    t = m.loss(x)
    _, _, z = same_z(m, x, 0)
    torch.testing.assert_close(t["mse"], (x - m.decode(z)).pow(2).mean())


# ---- remedies -------------------------------------------------------------------------------


def test_free_bits_clamp_per_dimension_of_the_batch_mean():
    x = blobs(32)
    for lam in (0.0, 0.05, 0.5, 50.0):
        m = tiny(free_bits=lam, latent_dim=6)
        torch.manual_seed(3)
        terms = m.loss(x)
        mu, logvar, _ = same_z(m, x, 3)
        kl_u = 0.5 * (mu.double() ** 2 + logvar.double().exp() - 1 - logvar.double())  # (B, D)
        want = kl_u.mean(0).clamp_min(lam).sum()
        torch.testing.assert_close(terms["kl_term"].double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(terms["kl"].double(), kl_u.sum(1).mean(), rtol=1e-5, atol=1e-6)
        # the same noise as without free bits: z (hence recon) does not change
        ref = tiny(latent_dim=6)
        torch.manual_seed(3)
        torch.testing.assert_close(ref.loss(x)["recon"], terms["recon"])
    # lambda above every dimension's KL: no KL gradient reaches the encoder through the KL term
    m = tiny(free_bits=50.0)
    mu, logvar = m.encode(x)
    terms = m.loss(x)
    g_kl = torch.autograd.grad(terms["kl_term"], [p for p in m.encoder.parameters()], allow_unused=True)
    assert all(g is None or float(g.abs().max()) == 0 for g in g_kl)


def test_kl_warmup_weight_rises_linearly_to_beta():
    m = tiny(beta=0.5, kl_warmup_steps=100)
    assert [m.kl_weight(s) for s in (0, 25, 50, 100, 1000)] == [0.0, 0.125, 0.25, 0.5, 0.5]
    assert m.kl_weight() == 0.5  # no step known: after warm-up
    x = blobs(16)
    opt = m.configure_optimizers()
    out = m.training_step(x, 10, opt)  # the trainer's hook tells the model its step
    assert m.step == 10 and float(out["kl_weight"]) == pytest.approx(0.05) and float(out["beta"]) == 0.5
    torch.testing.assert_close(out["loss"], out["recon"] + 0.05 * out["kl_term"], rtol=1e-6, atol=1e-5)
    torch.manual_seed(0)
    t0 = m.loss(x, step=0)
    torch.manual_seed(0)
    assert float(t0["kl_weight"]) == 0 and torch.equal(t0["loss"], t0["recon"])
    assert tiny(beta=2.0).kl_weight(0) == 2.0


# ---- likelihood bounds ----------------------------------------------------------------------


def test_iwae_is_above_elbo_and_rises_with_k():
    m, x = tiny(latent_dim=3), blobs(24)
    fit(m, x, steps=30, batch_size=24, progress=False, lr=3e-3)  # a posterior narrower than the prior
    m.eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        elbo = torch.stack([m.elbo(x, generator=g) for _ in range(200)]).mean(0)  # E[ELBO] per example
        k1 = torch.stack([m.log_likelihood(x, k=1, generator=g) for _ in range(200)]).mean(0)
        means = [float(m.log_likelihood(x, k=k, generator=g).mean()) for k in (1, 10, 100, 1000)]
    # k = 1 is the ELBO in expectation
    assert float((k1 - elbo).mean().abs()) < 0.05 * float(elbo.std() + 1)
    assert means == sorted(means) and means[-1] > float(elbo.mean())
    # logmeanexp is pygen.metrics'
    w = torch.randn(5, 7, dtype=torch.float64)
    torch.testing.assert_close(logmeanexp(w, 0), torch.logsumexp(w, 0) - math.log(5))
    # chunked over k: the same draws, the same result
    import pygen.models.vae as vae_mod

    full = m.log_likelihood(x, k=8, generator=torch.Generator().manual_seed(7))
    old = vae_mod._IWAE_CHUNK_ELEMENTS
    vae_mod._IWAE_CHUNK_ELEMENTS = 24 * 64 * 3  # chunks of 3 samples
    try:
        chunked = m.log_likelihood(x, k=8, generator=torch.Generator().manual_seed(7))
    finally:
        vae_mod._IWAE_CHUNK_ELEMENTS = old
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=0)


# ---- measurements ---------------------------------------------------------------------------


def _constructed_encoder(m: VAE, used: int) -> None:
    """Make mu ignore every latent dim >= used (zero rows), with logvar = -2 on used dims and
    a tiny logvar 1e-6 on the others (a collapsed dim whose KL is ~ 2.5e-13)."""
    head = m.encoder[1][-1]  # the MLP's last Linear: (2D, hidden)
    d = m.latent_dim
    with torch.no_grad():
        head.weight[used:d].zero_()
        head.bias[used:d].zero_()
        head.weight[d:].zero_()
        head.bias[d:].fill_(1e-6)
        head.bias[d : d + used].fill_(-2.0)
        head.weight[:used] *= 20  # used dims vary a lot across x


def test_active_units_and_kl_per_dim_on_a_constructed_encoder():
    m = tiny(network="mlp", latent_dim=6)
    _constructed_encoder(m, used=2)
    x = blobs(64)
    assert active_units(m, x) == 2
    rep = latent_report(m, x)
    assert rep["active_units"] == 2 and len(rep["kl_per_dim"]) == 6 and len(rep["mean_variance"]) == 6
    assert all(v > 0.01 for v in rep["mean_variance"][:2]) and all(v == 0 for v in rep["mean_variance"][2:])
    kl = kl_per_dim(m, x)
    mu, logvar = m.encode(x)
    want = 0.5 * (mu.double() ** 2 + torch.expm1(logvar.double()) - logvar.double())
    torch.testing.assert_close(kl[:2], want.mean(0)[:2], rtol=1e-5, atol=0)
    # collapsed dims: KL = 0.5 (e^lv - 1 - lv) ~ 0.25 lv^2 = 2.5e-13, accurate (no cancellation)
    torch.testing.assert_close(kl[2:], torch.full((4,), 0.25e-12, dtype=torch.float64), rtol=1e-3, atol=0)
    assert rep["kl"] == pytest.approx(float(kl.sum()))
    assert active_units(m, x, threshold=1e9) == 0


def test_aggregate_posterior_mismatch():
    z = torch.randn(20000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert gaussian_kl_to_prior(z) < 1e-3
    # N(m, s^2 I): 0.5 (3 s^2 + |m|^2 - 3 - 3 log s^2)
    y = 2 * z + 1
    assert gaussian_kl_to_prior(y) == pytest.approx(0.5 * (12 + 3 - 3 - 3 * math.log(4)), rel=2e-2)

    m = tiny(network="mlp", latent_dim=6)
    _constructed_encoder(m, used=2)
    x = blobs(256)
    mis = aggregate_posterior_mismatch(m, x)
    mis_mean = aggregate_posterior_mismatch(m, x, latents="mean")
    assert set(mis) == {"fd", "kl_gaussian", "mean_norm", "var_min", "var_max"}
    assert mis["fd"] > 0 and mis["kl_gaussian"] > 0 and mis_mean["var_min"] == 0
    dec = aggregate_posterior_samples(m, x)
    assert dec.shape == x.shape
    terms = elbo_terms(m, x)
    assert {"recon", "kl", "elbo", "mse"} <= set(terms) and terms["elbo"] < 0


def test_variance_loss_on_constructed_sets():
    real = blobs(50)
    mean = real.flatten(1).mean(1).view(-1, 1, 1, 1)
    flat = mean + 0.5 * (real - mean)  # each image's deviation halved: variance / 4
    v = real.flatten(1).double().var(1, unbiased=False).mean()
    assert variance_loss(real, flat) == pytest.approx(float(0.75 * v), rel=1e-6)
    assert variance_loss(real, real) == 0
    assert variance_loss(real, flat, relative=True) == pytest.approx(0.75, rel=1e-6)
    assert variance_loss(real, torch.full_like(real, 0.3)) == pytest.approx(float(v), rel=1e-6)
    with pytest.raises(ValueError, match="equal-sized"):
        variance_loss(real, flat[:10])
    # the model's renormalisation with factor 2 undoes the halving (values stay inside [0, 1])
    m = tiny()
    torch.testing.assert_close(m.renormalize_variance(flat, 2.0), real, atol=1e-6, rtol=0)


def test_calibrated_renormalisation_matches_the_data_variance():
    m, x = tiny(), blobs(200)
    m.eval()
    scale = m.calibrate_variance(x, seed=1)
    assert scale > 1  # an untrained decoder's samples are flat
    s = m.sample(200, seed=1, renormalize=True)
    assert abs(variance_loss(x, s, relative=True)) < 0.05  # clamping may cost a little
    assert variance_loss(x, m.sample(200, seed=1, renormalize=False)) > variance_loss(x, s)
    torch.testing.assert_close(m.sample(200, seed=1), s, rtol=0, atol=0)  # calibrated: the default


# ---- sampling, second stage, files ---------------------------------------------------------


def _assert_index_pure(m: VAE, **kw) -> None:
    full = m.sample(16, seed=3, **kw)
    torch.testing.assert_close(m.sample(8, seed=3, **kw), full[:8], atol=1e-5, rtol=0)
    torch.testing.assert_close(m.sample(8, seed=3, offset=8, **kw), full[8:], atol=1e-5, rtol=0)
    torch.testing.assert_close(m.sample(1, seed=3, offset=5, **kw), full[5:6], atol=1e-5, rtol=0)
    assert not torch.allclose(m.sample(8, seed=4, **kw), full[:8])


@pytest.mark.parametrize("network", ["conv", "mlp"])
def test_sample_depends_on_seed_and_index_only(network):
    m = tiny(network=network).eval()
    _assert_index_pure(m)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    torch.testing.assert_close(m.sample(4, generator=g1), m.sample(4, generator=g2))
    assert m.sample(4, seed=0).shape == (4, 1, 8, 8)


def test_counter_uniforms_and_derived_seeds():
    u = counter_uniform(4000, seed=9)
    assert float(u.min()) > 0 and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.02
    torch.testing.assert_close(counter_uniform(10, seed=9, offset=5), u[5:15])
    assert len({derive_seed(1, s) for s in range(5)} | {derive_seed(2, 1)}) == 6


@pytest.mark.parametrize("kind", ["gmm", "flow"])
def test_second_stage_fitted_used_by_sample_and_saved(kind, tmp_path):
    m, x = tiny(latent_dim=3), blobs(128)
    fit(m, x, steps=20, batch_size=32, progress=False, lr=3e-3)
    m.eval()
    prior = m.sample(64, seed=1)
    kw = {"components": 3} if kind == "gmm" else {"steps": 30, "hidden": 8, "n_layers": 2}
    m.fit_second_stage(x, kind, **kw)
    assert m.config["second_stage"]["kind"] == kind
    staged = m.sample(64, seed=1)
    assert not torch.allclose(staged, prior)
    torch.testing.assert_close(m.sample(64, seed=1, second_stage=False), prior)  # the prior stays available
    _assert_index_pure(m)
    if kind == "gmm":
        # latents follow the mixture: their mean is the mixture's mean
        z = m.latents(20000, seed=0)
        want = (m.gmm_weights[:, None] * m.gmm_means).sum(0)
        torch.testing.assert_close(z.mean(0), want, atol=0.05, rtol=0)
    path = tmp_path / "vae.pt"
    m.save(path)
    back = load(path)
    assert back.config == m.config and back.config["second_stage"]["kind"] == kind
    torch.testing.assert_close(back.sample(16, seed=1), m.sample(16, seed=1))
    # refitting replaces the stage (another kind)
    other = "flow" if kind == "gmm" else "gmm"
    m.fit_second_stage(x, other, **({"components": 2} if other == "gmm" else {"steps": 5, "hidden": 8, "n_layers": 1}))
    assert m.config["second_stage"]["kind"] == other
    assert (m.prior_flow is None) == (other == "gmm") and ("gmm_means" in m.state_dict()) == (other == "gmm")


def test_save_load_round_trip_through_the_registry(tmp_path):
    m = tiny(likelihood="gaussian", gamma="running", free_bits=0.1, kl_warmup_steps=5)
    m.running_mse.fill_(0.0123)
    m.var_scale.fill_(1.5)
    m.save(tmp_path / "m.pt")
    assert pygen.models.families()["vae"] is VAE
    back = load(tmp_path / "m.pt")
    assert isinstance(back, VAE) and back.config == m.config
    assert float(back.running_mse) == pytest.approx(0.0123) and float(back.var_scale) == 1.5
    m.eval()
    torch.testing.assert_close(back.sample(8, seed=2), m.sample(8, seed=2))
    x = blobs(4)
    torch.testing.assert_close(back.reconstruct(x), m.reconstruct(x))


def test_conditional_vae():
    m, x = tiny(num_classes=3), blobs(12)
    labels = torch.arange(12) % 3
    terms = m.loss((x, labels))
    assert torch.isfinite(terms["loss"])
    with pytest.raises(ValueError, match="conditional"):
        m.loss(x)
    m.eval()
    a, b = m.sample(4, seed=0, labels=0), m.sample(4, seed=0, labels=torch.tensor([1, 1, 1, 1]))
    assert not torch.allclose(a, b)  # the decoder sees the label
    torch.testing.assert_close(m.sample(2, seed=0, labels=torch.tensor([0, 1])), torch.cat([a[:1], b[1:2]]))
    _assert_index_pure(m)  # random labels from a derived stream, offset rule
    assert m.interpolate(x[0], x[1], 5, labels=2).shape == (5, 1, 8, 8)
    assert m.log_likelihood(x, k=4, labels=labels).shape == (12,)
    assert active_units(m, (x, labels)) >= 0
    fit(m, (x, labels), steps=3, batch_size=6, progress=False)  # batches are (x, labels)


def test_reconstruct_and_interpolate():
    m, x = tiny(), blobs(6)
    m.eval()
    path = m.interpolate(x[:2], x[2:4], steps=5)
    assert path.shape == (2, 5, 1, 8, 8)
    torch.testing.assert_close(path[:, 0], m.reconstruct(x[:2]), atol=1e-5, rtol=0)
    torch.testing.assert_close(path[:, -1], m.reconstruct(x[2:4]), atol=1e-5, rtol=0)
    torch.testing.assert_close(m.interpolate(x[0], x[2], steps=5), path[0], atol=1e-5, rtol=0)


def test_constructor_validation_and_config():
    with pytest.raises(ValueError, match="likelihood"):
        VAE((1, 8, 8), likelihood="poisson")
    with pytest.raises(ValueError, match="gamma"):
        VAE((1, 8, 8), likelihood="gaussian", gamma="adaptive")
    with pytest.raises(ValueError, match="conv"):
        VAE((5,), network="conv")
    m = tiny()
    rebuilt = VAE(**m.config)
    assert rebuilt.config == m.config
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in m.parameters()]


def test_short_training_loss_falls():
    m, x = tiny(latent_dim=4, kl_warmup_steps=20, free_bits=0.05), blobs(256)
    hist = fit(m, x, steps=80, batch_size=64, progress=False, log_every=20, lr=3e-3)
    assert hist[-1]["loss"] < 0.8 * hist[0]["loss"]
    assert hist[0]["kl_weight"] < 1.0 and hist[-1]["kl_weight"] == 1.0
    assert all(math.isfinite(h["loss"]) for h in hist)
    m2 = tiny(likelihood="gaussian", gamma="running")
    hist2 = fit(m2, x, steps=60, batch_size=64, progress=False, log_every=20, lr=3e-3)
    assert float(m2.running_mse) < 1.0 and hist2[-1]["mse"] < hist2[0]["mse"]


def test_defaults_sized_by_the_data():
    """for_data / train_defaults_for: the digits' small VAE below 256 values per example, the
    larger one measured on Fashion-MNIST from 256 up; both clamp logvar and fit the post-hoc stages."""
    from types import SimpleNamespace

    def data(*shape):
        return SimpleNamespace(shape=shape, labels=None, kind="image", bins=256)

    small, edge, large = data(1, 15, 17), data(1, 16, 16), data(1, 28, 28)
    for d, hidden, latent, steps in ((small, 256, 16, 2000), (edge, 512, 32, 120000), (large, 512, 32, 120000)):
        m = VAE.for_data(d)
        assert (m.config["hidden"], m.latent_dim, m.config["logvar_range"], m.config["post_hoc"]) == (
            hidden, latent, [-20.0, 4.0], True)
        assert VAE.train_defaults_for(d) == {"steps": steps, "batch_size": 128, "lr": 2e-3}
    assert VAE.for_data(large, hidden=64, latent_dim=3).config["hidden"] == 64  # options win
    assert VAE.for_data(large, hidden=64, latent_dim=3).latent_dim == 3
    assert VAE((1, 28, 28)).config["post_hoc"] is False and VAE((1, 28, 28)).config["logvar_range"] is None
