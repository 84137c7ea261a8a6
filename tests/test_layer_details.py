"""Details of the model layer that a uniform mutation sample (300 of its 11,572 mutants) found
unchecked, each against an exact answer: WGAN-GP's penalty, the GAN generator's sigmoid
output, which buffers a checkpoint holds, the feature nets' training augmentation and
accuracy, and evaluate's table."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pygen.metrics.evaluate import format_table
from pygen.metrics.train_features import _shift_flip, accuracy
from pygen.models.gan import Generator, gradient_penalty
from pygen.models.precond import VP
from pygen.models.unet import SinusoidalEmbedding


def test_gradient_penalty_exact_and_finite_at_a_zero_gradient():
    real, fake = torch.ones(5, 1, 2, 3, dtype=torch.float64), torch.zeros(5, 1, 2, 3, dtype=torch.float64)
    # D(x) = |x|^2 / 2: grad = x_hat = e (per example), so ||grad|| = e sqrt(6)
    got = gradient_penalty(lambda x: x.square().flatten(1).sum(1) / 2, real, fake,
                           generator=torch.Generator().manual_seed(3))
    e = torch.rand(5, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).flatten()
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(((e * 6**0.5 - 1) ** 2).mean().item(), rel=1e-9)
    # a constant critic: zero gradient, the penalty (0 - 1)^2 = 1 and finite (the eps inside the root)
    w = torch.zeros((), requires_grad=True)
    flat = gradient_penalty(lambda x: w * 0 + x.sum((1, 2, 3)) * 0, real.float(), fake.float())
    assert torch.isfinite(flat) and flat.item() == pytest.approx(1.0, rel=1e-5)


def test_generator_sigmoid_output():
    torch.manual_seed(0)
    g = Generator(z_dim=8, shape=(1, 8, 8), output="sigmoid")
    x = g(torch.randn(4, 8))
    assert x.shape == (4, 1, 8, 8) and bool(((x > 0) & (x < 1)).all())
    with pytest.raises(ValueError, match="output"):
        Generator(z_dim=8, shape=(1, 8, 8), output="relu")


def test_derived_buffers_stay_out_of_checkpoints():
    # derived from the config: a checkpoint holding them would refuse a config that derives others
    assert "freqs" not in SinusoidalEmbedding(8).state_dict()
    assert "freqs" in dict(SinusoidalEmbedding(8).named_buffers())
    assert list(VP("epsilon", torch.linspace(0.1, 1, 5)).state_dict()) == []


def test_shift_flip_is_the_seeded_shift_then_flip():
    b, h, w, shift = 6, 5, 7, 2
    x = torch.rand(b, 1, h, w)
    got = _shift_flip(x, torch.Generator().manual_seed(4), shift=shift)
    g = torch.Generator().manual_seed(4)
    dy, dx = torch.randint(0, 2 * shift + 1, (2, b), generator=g)
    flip = torch.rand(b, generator=g) < 0.5
    pad = F.pad(x, (shift,) * 4)
    for i in range(b):
        want = pad[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        assert torch.equal(got[i], want.flip(-1) if flip[i] else want), i
    assert 0 < int(flip.sum()) < b  # both branches are checked


def test_accuracy_is_the_share_of_test_digits_predicted():
    from pygen.data import digits

    _, y = digits("test", size=16)

    class HalfRight:
        def predict(self, x):
            assert x.shape[-1] == 16
            p = y.clone()
            p[: len(y) // 2] = (p[: len(y) // 2] + 1) % 10
            return p

    assert accuracy(HalfRight(), 16) == pytest.approx((len(y) - len(y) // 2) / len(y), rel=1e-12)


def test_format_table_rows_and_meta_line():
    table = format_table({"fd": 1.23456, "baseline_data": {"fd": 0.5}, "meta": {"n": 10, "data": "digits"}})
    lines = table.split("\n")
    assert lines[0] == "| metric | better | model | held-out data (floor) |"
    assert lines[2].startswith("| fd | lower | 1.235 | 0.5 |")
    assert lines[-2:] == ["", "n: 10; data: digits"]


def _vae(**kw):
    from pygen.models import VAE

    torch.manual_seed(0)
    return VAE((1, 4, 4), latent_dim=3, hidden=8, network="mlp", **kw)


def test_vae_logvar_range_clamps_the_encoder():
    vae = _vae(logvar_range=(-1.0, 0.5))
    with torch.no_grad():
        for p in vae.parameters():
            p.mul_(50)  # logvars far outside the range
    _, logvar = vae.encode(torch.rand(16, 1, 4, 4))
    assert logvar.min().item() == -1.0 and logvar.max().item() == 0.5


def test_vae_learned_gamma_and_latents_from_a_generator():
    vae = _vae(likelihood="gaussian", gamma="learned")
    with torch.no_grad():
        vae.log_gamma.fill_(-1.25)
    g = vae.gamma()
    assert g.item() == pytest.approx(torch.tensor(-1.25).exp().item(), rel=1e-7) and g.requires_grad
    a = vae.latents(5, generator=torch.Generator().manual_seed(1))
    b = vae.latents(5, generator=torch.Generator().manual_seed(1))
    c = vae.latents(5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_aggregate_posterior_mismatch_is_seeded():
    from pygen.metrics import aggregate_posterior_mismatch

    vae, x = _vae(), torch.rand(64, 1, 4, 4)
    a, b = (aggregate_posterior_mismatch(vae, x, seed=3) for _ in range(2))
    assert a == b and a != aggregate_posterior_mismatch(vae, x, seed=4)


@pytest.mark.parametrize("fmt", ["npz", "png"])
def test_sampling_job_reports_shards_timing_and_versions(tmp_path, fmt):
    import json

    import pygen
    from pygen.sampling import MANIFEST, SampleDir, describe, sample_to_dir

    ckpt = tmp_path / "vae.pt"
    _vae().save(ckpt)
    calls: list[tuple[int, int]] = []
    m = sample_to_dir(ckpt, 10, tmp_path / "s", batch_size=4, shard_size=4, fmt=fmt, progress=False, grid=False,
                      on_shard=lambda a, b: calls.append((a, b)))
    assert calls == [(0, 4), (4, 8), (8, 10)]
    saved = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert saved["versions"] == {"pygen": str(pygen.__version__), "torch": torch.__version__} == m["versions"]
    assert isinstance(saved["seconds"], float) and saved["seconds"] > 0 and saved["sampled"] == 10
    kind = "shards" if fmt == "npz" else "PNG ranges"
    rate = f"{10 / saved['seconds']:,.0f} samples/s"
    assert describe(saved) == (f"10 samples of vae (seed 0) in 3 {kind}; this run sampled 10 in "
                               f"{saved['seconds']:.1f} s ({rate})")
    job = SampleDir(tmp_path / "s")
    assert job.read(3, 3).shape == (0, 1, 4, 4) and job.read(2, 5).shape == (3, 1, 4, 4)  # an empty range too


def test_resume_warnings_point_at_the_callers_line(tmp_path):
    import warnings

    from pygen.train import fit

    data = torch.rand(32, 1, 4, 4)
    fit(_vae(), data, steps=2, batch_size=8, progress=False, out=tmp_path, lr_schedule="cosine")
    for change in ({"seed": 1, "steps": 3}, {"steps": 4}):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(_vae(), data, batch_size=8, progress=False, out=tmp_path, resume=True, lr_schedule="cosine",
                **{"steps": 3, **change})
        ours = [w for w in caught if "resuming" in str(w.message)]
        assert ours and all(w.filename == __file__ for w in ours), [(w.filename, str(w.message)) for w in caught]


def test_gan_step_terms_and_the_divergence_message_of_the_g_step():
    from pygen.models import GAN
    from pygen.train.loop import TrainingDiverged

    torch.manual_seed(0)
    gan = GAN((2,), z_dim=4)
    opts = [torch.optim.Adam(gan.discriminator.parameters()), torch.optim.Adam(gan.generator.parameters())]
    x = torch.randn(16, 2)
    torch.manual_seed(1)
    out = gan.training_step(x, 0, opts)
    assert {"loss", "loss_d", "loss_g", "d_real", "d_fake", "d_fake_g"} <= set(out)
    gan.max_loss = 1e-12  # any loss now "explodes": the D step's first
    with pytest.raises(TrainingDiverged, match=r"^GAN training diverged at training step 5: \|loss_d\| = "):
        gan.training_step(x, 4, opts)
    with pytest.raises(TrainingDiverged, match=r"^GAN training diverged at training step 8: \|loss_g\| = .* > max_loss "
                                               r"1e-12 \(loss=hinge\)$") as e:
        gan.generator_step(x, 7, opts[1])
    assert e.value.step == 8


def test_super_resolution_scale_from_the_data_and_sample_aug_saved(tmp_path):
    from types import SimpleNamespace

    from pygen.models import load
    from pygen.models.conditioned import SuperResolution

    data = SimpleNamespace(shape=(1, 8, 12), low_res=torch.zeros(5, 1, 2, 3))  # 12 / 3 columns: x4
    assert SuperResolution.for_data(data).scale == 4
    assert SuperResolution.for_data(data, scale=2).scale == 2  # given explicitly: kept
    torch.manual_seed(0)
    sr = SuperResolution((1, 8, 8), scale=2, sample_aug=0.1)
    sr.save(tmp_path / "sr.pt")
    assert load(tmp_path / "sr.pt").sample_aug == pytest.approx(0.1)


def test_mlp_layers_and_the_vae_decoder_width():
    from pygen.models.networks import MLP

    shapes = lambda m: [tuple(l.weight.shape) for l in m if isinstance(l, torch.nn.Linear)]  # noqa: E731
    assert shapes(MLP(3, 2, hidden=5, layers=3)) == [(5, 3), (5, 5), (5, 5), (2, 5)]
    assert shapes(MLP(3, 2, hidden=5, layers=0)) == [(2, 3)]
    vae = _vae()  # hidden=8: the decoder as wide as the encoder
    assert {s[0] for s in shapes(vae.decoder.modules()) if s[0] != 16} == {8}


def test_evaluate_refuses_n_below_4_and_names_a_wrong_sample_shape():
    from pygen.metrics import evaluate

    class Wrong:
        def sample(self, n, *, seed=None):
            return torch.rand(n, 3)

    with pytest.raises(ValueError, match=r"^n must be >= 4 \(recall's k-NN radii over the samples use k = 3\), got 3$"):
        evaluate(None, "two_moons", n=3)  # was refused only below 2, then failed inside recall
    assert 0 <= evaluate(None, "two_moons", n=4, n_reference=50)["baseline_data"]["recall"] <= 1
    with pytest.raises(ValueError, match=r"^model.sample\(4\) must return a tensor of shape \(4, 2\), got \(4, 3\)$"):
        evaluate(Wrong(), "two_moons", n=4, n_reference=50)


def test_a_class_conditional_diffusion_builds_a_conditional_network():
    from pygen.models import Diffusion

    for shape in ((1, 8, 8), (2,)):
        torch.manual_seed(0)
        emb = [m for m in Diffusion(shape, num_classes=3).net.modules() if isinstance(m, torch.nn.Embedding)]
        assert [e.num_embeddings for e in emb] == [4], shape  # 3 labels + the unconditional one


def test_step_time_probe_runs_warm_up_plus_min_steps(monkeypatch):
    from pygen.models import VAE
    from pygen.train.budget import measure_step_seconds

    calls = []
    step = VAE.training_step
    monkeypatch.setattr(VAE, "training_step", lambda self, *a, **k: calls.append(1) or step(self, *a, **k))
    vae, x = _vae(), torch.rand(32, 1, 4, 4)
    assert measure_step_seconds(vae, x, batch_size=8, min_seconds=0) > 0
    assert len(calls) == 1 + 3  # one warm-up step, then the default 3 timed
    calls.clear()
    measure_step_seconds(vae, x, batch_size=8, min_steps=200, min_seconds=0)
    assert len(calls) == 201  # as many as asked: the probe's fit is not capped


def test_a_resume_with_another_lr_says_so_once_and_applies_it(tmp_path):
    import warnings

    from pygen.train import fit

    data = torch.rand(32, 1, 4, 4)
    fit(_vae(), data, steps=2, batch_size=8, lr=1e-3, progress=False, out=tmp_path)
    for lr, warned in ((1e-3, False), (5e-4, True)):
        model = _vae()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hist = fit(model, data, steps=3 if not warned else 4, batch_size=8, lr=lr, progress=False,
                       out=tmp_path, resume=True, log_every=1)
        ours = [str(w.message) for w in caught if "with lr" in str(w.message)]
        if warned:
            assert ours == [f"resuming from {tmp_path / 'ckpt-3.pt'} with lr 0.0005 (base lrs 0.001 before): the "
                            "schedule continues from the new base"], ours
        else:
            assert ours == []
        assert hist[-1]["lr"] == pytest.approx(lr)  # the new base applies


def test_latent_diffusion_halves_twice_only_when_both_sides_are_16_or_more():
    from pygen.data import Data
    from pygen.models import LatentDiffusion

    for hw, levels in (((12, 20), 1), ((20, 12), 1), ((16, 16), 2), ((16, 40), 2), ((12, 12), 1)):
        torch.manual_seed(0)
        model = LatentDiffusion.for_data(Data(torch.rand(8, 1, *hw), None, "x"), unconditional=True)
        assert model.config["levels"] == levels, hw


def test_flow_for_data_with_another_kind_drops_the_default_kinds_layer_options():
    from pygen.data import Data
    from pygen.models import Flow

    torch.manual_seed(0)
    images = Data(torch.rand(8, 1, 8, 8), None, "x")  # Glow's defaults: levels, depth, hidden
    assert Flow.for_data(images, kind="realnvp").config["kind"] == "realnvp"  # RealNVP takes no depth / levels


def test_gan_evaluation_loss_and_the_collapse_message():
    from pygen.models import GAN
    from pygen.train.loop import TrainingDiverged

    torch.manual_seed(0)
    gan = GAN((2,), z_dim=4)
    x = torch.randn(16, 2)
    torch.manual_seed(1)
    ev = gan.loss(x)  # phase None: both adversarial losses, no penalties
    assert set(ev) == {"loss", "loss_d", "loss_g", "d_real", "d_fake"}
    assert torch.equal(ev["loss"], ev["loss_d"] + ev["loss_g"])
    with torch.no_grad():
        for p in gan.generator.parameters():
            p.zero_()  # every fake is the same point: a collapse
    opt = torch.optim.Adam(gan.generator.parameters())
    with pytest.raises(TrainingDiverged, match=r"^GAN training collapsed at training step 6: every generated sample "
                                               r"of the batch is the same \(spread 0 < ") as e:
        gan.generator_step(x, 5, opt)
    assert e.value.step == 6


def test_second_stage_on_the_posterior_means_fits_the_means():
    vae, x = _vae(), torch.rand(64, 1, 4, 4)
    vae.fit_second_stage(x, components=1, latents="mean", seed=0)
    mu, _ = vae.encode_data(x)
    # one full-covariance component on the means: its mean is theirs
    assert torch.allclose(vae.gmm_means[0].double(), mu.double().mean(0), atol=1e-5)
    assert vae.config["second_stage"]["kind"] == "gmm"


def test_a_failed_second_stage_fit_leaves_no_stage_and_a_loadable_model(tmp_path):
    from pygen.models import load

    vae, x = _vae(), torch.rand(64, 1, 4, 4)
    vae.fit_second_stage(x, components=1, latents="mean", seed=0)
    with pytest.raises(ValueError):  # more components than examples: scikit-learn refuses
        vae.fit_second_stage(x[:4], components=10, latents="mean", seed=0)
    assert vae.config["second_stage"] is None and "gmm_means" not in dict(vae.named_buffers())
    vae.save(tmp_path / "v.pt")
    assert torch.equal(load(tmp_path / "v.pt").latents(3, seed=1), vae.latents(3, seed=1))  # from the prior


def test_aggregate_posterior_samples_of_a_conditional_vae_decode_with_the_labels():
    from pygen.metrics import aggregate_posterior_samples
    from pygen.models.seeding import randn

    vae, x, y = _vae(num_classes=2), torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 1, 0, 1, 0])
    got = aggregate_posterior_samples(vae, (x, y), seed=5, batch_size=4)
    mu, logvar = vae.encode(x, y)
    z = mu + torch.exp(0.5 * logvar) * randn(*mu.shape, seed=5)
    assert torch.allclose(got, vae.decode(z, y), atol=1e-6)
    assert not torch.allclose(got, vae.decode(z, 1 - y), atol=1e-3)  # the labels matter


def test_kl_autoencoder_channel_widths_and_a_narrow_width():
    from pygen.models.autoencoder import KLAutoencoder

    convs = lambda m: [l.out_channels for l in m.modules() if isinstance(l, torch.nn.Conv2d)]  # noqa: E731
    ae = KLAutoencoder((1, 8, 8), levels=2, width=8)
    assert sorted(set(convs(ae.encoder))) == [8, 16, 32]  # 2 * width at 1/2, 4 * width at 1/4, 2 * 4 latent
    ae = KLAutoencoder((1, 8, 12), levels=1, width=2)  # 4 channels: groups must divide them
    assert ae.latent_shape == (4, 4, 6)


def test_guidance_defaults_to_the_conditional_prediction():
    from pygen.models import Diffusion

    torch.manual_seed(0)
    d = Diffusion((2,), num_classes=3)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.1 * torch.randn_like(p))  # a zero-initialised output layer would hide the labels
    x, sigma, y = torch.randn(4, 2), torch.full((4,), 0.5), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        assert torch.equal(d.guided(x, sigma, y), d.guided(x, sigma, y, guidance_scale=1.0))
        assert not torch.allclose(d.guided(x, sigma, y), d.guided(x, sigma, y, guidance_scale=2.0))


def test_sampling_a_vae_with_diffusion_options_names_the_flag(tmp_path):
    from pygen.sampling import SamplingError, sample_to_dir

    ckpt = tmp_path / "vae.pt"
    _vae().save(ckpt)
    for opt, flag in (({"steps": 5}, "--steps"), ({"sampler": "ddim"}, "--sampler"), ({"guidance": 2.0}, "--guidance")):
        with pytest.raises(SamplingError, match=rf"^{flag} does not apply to a 'vae' model \(its sample\(\) takes "):
            sample_to_dir(ckpt, 4, tmp_path / "s", progress=False, grid=False, **opt)


def test_resume_trims_metrics_past_the_checkpoint_and_keeps_lines_without_a_step(tmp_path):
    import json

    from pygen.train import fit
    from pygen.train.loop import METRICS

    data = torch.rand(32, 1, 4, 4)
    fit(_vae(), data, steps=2, batch_size=8, progress=False, out=tmp_path, log_every=1)
    log = tmp_path / METRICS
    # a note without a step (kept), a record past the checkpoint (dropped: the resume redoes it), a cut line
    log.write_text(log.read_text() + '{"note": "user"}\n{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
    fit(_vae(), data, steps=2, batch_size=8, progress=False, out=tmp_path, resume=True, log_every=1)
    steps = [json.loads(line).get("step") for line in log.read_text().splitlines()]
    assert steps == [1, 2, None], steps


def test_a_checkpoint_whose_config_asks_for_far_more_than_its_weights_is_refused(tmp_path):
    from pygen.models import load
    from pygen._io import CorruptCheckpoint

    _vae().save(tmp_path / "v.pt")
    ckpt = torch.load(tmp_path / "v.pt", weights_only=False)
    ckpt["config"]["hidden"] = 100_000  # 10^10 weights in the 100k x 100k layers
    torch.save(ckpt, tmp_path / "big.pt")
    with pytest.raises(CorruptCheckpoint, match=r"big.pt: its config builds a model of .* GB for .* of weights: a "
                                                r"damaged or foreign checkpoint$"):
        load(tmp_path / "big.pt")


def test_min_snr_weighting_is_vps_and_refused_with_edm():
    from pygen.models import Diffusion

    with pytest.raises(ValueError, match=r"^snr_gamma \(Min-SNR weighting\) is for precond='vp'; EDM weights its "
                                         r"loss itself, got snr_gamma=5.0 with precond='edm'$"):
        Diffusion((2,), snr_gamma=5.0)
    losses = []
    for gamma in (None, 0.5):
        torch.manual_seed(0)
        d = Diffusion((2,), precond="vp", snr_gamma=gamma)
        torch.manual_seed(1)
        losses.append(d.loss(torch.randn(64, 2))["loss"].item())
    assert losses[1] < losses[0]  # Min-SNR caps the weight of the low-noise steps at gamma / SNR < 1


def test_ddpm_loss_draws_every_training_timestep(monkeypatch):
    import pygen.models.diffusion as diffusion

    seen = []
    real = diffusion.diffusion_loss
    monkeypatch.setattr(diffusion, "diffusion_loss", lambda *a, t, **k: seen.append(t) or real(*a, t=t, **k))
    torch.manual_seed(0)
    d = diffusion.Diffusion((2,), precond="vp", num_train_timesteps=50)
    torch.manual_seed(1)
    d.loss(torch.randn(2000, 2))
    assert sorted(set(seen[0].tolist())) == list(range(50))  # uniform on 0 .. T-1: t = 0 included


def test_a_super_resolution_job_upsamples_the_datas_test_inputs(tmp_path):
    from pygen.data import load as load_data
    from pygen.models.conditioned import SuperResolution
    from pygen.sampling import SampleDir, sample_to_dir

    torch.manual_seed(0)
    sr = SuperResolution((3, 32, 32), scale=4, width=8, mults=[1], blocks=1, attention=[])
    sr.save(tmp_path / "sr.pt")
    sample_to_dir(tmp_path / "sr.pt", 2, tmp_path / "s", data="patches", steps=2, progress=False, grid=False)
    got = SampleDir(tmp_path / "s").read(0, 2)
    low = load_data("patches", "test").low_res[:2]
    want = sr.sample(2, low_res=low, steps=2, seed=0)
    assert torch.allclose(got, want, atol=1e-5)


def test_a_job_larger_than_the_free_space_is_one_line_before_anything_is_written(tmp_path):
    from pygen.sampling import SamplingError, sample_to_dir

    _vae().save(tmp_path / "vae.pt")
    n = 10**12  # 16 floats each: 64 TB
    with pytest.raises(SamplingError, match=rf"^-n {n} needs about 6.4e\+04 GB in .*s \(0 GB of it written\); "
                                            r"[0-9.e+]+ GB are free there: sample fewer, or into a larger disk$"):
        sample_to_dir(tmp_path / "vae.pt", n, tmp_path / "s", progress=False, grid=False)
    assert not any(p.suffix in (".npz", ".png") for p in (tmp_path / "s").iterdir())
