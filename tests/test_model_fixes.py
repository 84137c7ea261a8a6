"""The model layer's silent wrong results of issue 17 (A1-A9), each with a test that failed on
the code before the fix: the sampling job's identity, eval mode while sampling, the EMA after
fit, --no-ema for a GAN, conditional sampling and likelihood without labels, one bits/dim
rule, a seeded IWAE likelihood, the GAN's logged R1 after a resume, and torch.compile of the
default call forms."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from pygen.data import Data
from pygen.models import GAN, VAE, Diffusion, Flow, LatentDiffusion, load
from pygen.sampling import SamplingError, sample_to_dir
from pygen.train import fit

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


def points(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 2) two labelled Gaussian blobs and their labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 2, generator=g) * 0.3 + torch.stack([labels * 2.0 - 1, labels * 0.0], 1)
    return x, labels


def tiny_diffusion(**kw) -> Diffusion:
    torch.manual_seed(0)
    return Diffusion((2,), hidden=16, layers=1, **kw)


@pytest.fixture(scope="module")
def diffusion_run(trained_run) -> Path:
    """A class-conditional vector diffusion model with an EMA, trained for 3 steps."""
    return trained_run("diffusion", tiny_diffusion(num_classes=2, ema_decay=0.5), points(), steps=3, batch_size=32)


# ---- A1: the sampling job's identity -------------------------------------------------------


def test_sampling_job_refuses_every_identity_field(diffusion_run, tmp_path):
    out = tmp_path / "s"
    base = dict(batch_size=8, shard_size=8, progress=False, grid=False)
    m = sample_to_dir(diffusion_run, 16, out, **base)
    # the manifest records what was used, defaults filled in
    assert m["sampler"] == {"sampler": "dpmpp_2m", "steps": 20, "guidance_scale": 1.0} and m["ema"] is True
    # a default given explicitly is the same job (accepted, nothing resampled)
    again = sample_to_dir(diffusion_run, 16, out, sampler="dpmpp_2m", steps=20, guidance=1.0, **base)
    assert again["sampled"] == 0
    changes = {
        "ema": dict(ema=False),
        "seed": dict(seed=1),
        "n": dict(n=24),
        "shard_size": dict(shard_size=4),
        "sampler": dict(sampler="ddim"),
        "steps": dict(steps=7),
        "guidance": dict(guidance=2.0),
        "labels": dict(labels="cycle"),
    }
    # (format: tests/test_sampling.py, images only; data: super-resolution models only)
    for what, change in changes.items():
        kw = {**base, **change}
        n = kw.pop("n", 16)
        with pytest.raises(SamplingError, match="another job") as e:
            sample_to_dir(diffusion_run, n, out, **kw)
        field = {"steps": "sampler", "guidance": "sampler"}.get(what, what)
        assert field in str(e.value), (what, str(e.value))
    assert json.loads((out / "manifest.json").read_text())["complete"] is True  # untouched


def test_sampling_job_old_manifest_without_defaults_resumes(diffusion_run, tmp_path):
    """A manifest that recorded only the settings given (pygen before the fix) is the same job."""
    out = tmp_path / "s"
    sample_to_dir(diffusion_run, 16, out, batch_size=8, shard_size=8, progress=False, grid=False)
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "sampler": {}}))
    assert sample_to_dir(diffusion_run, 16, out, batch_size=8, progress=False, grid=False)["sampled"] == 0


# ---- A2: sample() in eval mode, the caller's mode restored --------------------------------------


def _families() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "vae": VAE((1, 8, 8), 4, network="conv", width=8, norm="batch"),
        "gan": GAN((1, 8, 8), z_dim=4, g_width=8, d_width=8, g_norm="batch"),
        "flow": Flow("realnvp", (2,), hidden=8, n_layers=2),
        "diffusion": Diffusion((1, 8, 8), width=8, mults=[1], blocks=1, attention=False, dropout=0.5),
        "latent-diffusion": LatentDiffusion((1, 8, 8), levels=1, ae_width=4, width=8, mults=[1], blocks=1,
                                            attention=False),
    }


@pytest.mark.parametrize("name", ["vae", "gan", "flow", "diffusion", "latent-diffusion"])
def test_sample_runs_in_eval_mode_and_restores_the_mode(name):
    model = _families()[name]
    seen = []
    for module in model.modules():
        if module is not model:
            module.register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
    kw = {"steps": 2} if "diffusion" in name else {}
    model.train()
    a = model.sample(8, seed=0, **kw)
    assert seen and not any(seen), "a submodule ran in training mode while sampling"
    assert model.training and all(m.training for m in model.modules() if m is not getattr(model, "g_ema", None)
                                  and not any(m is x for x in getattr(model, "g_ema", nn.Module()).modules()))
    # dropout / batch statistics no longer make the samples depend on the batch or the call
    torch.testing.assert_close(model.sample(4, seed=0, **kw), a[:4], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.sample(8, seed=0, **kw), a, rtol=0, atol=0)
    model.eval()
    model.sample(2, seed=0, **kw)
    assert not model.training  # an eval-mode caller stays in eval mode


def test_fit_leaves_the_model_as_load_gives_it(tmp_path):
    x, _ = points()
    model = tiny_diffusion(dropout=0.5)
    fit(model, x, steps=2, batch_size=32, out=tmp_path / "run", progress=False)
    assert not model.training and not load(tmp_path / "run").training


# ---- A3: fit keeps the EMA it trained --------------------------------------------------------------


def test_after_fit_the_model_samples_as_load_does(tmp_path):
    x, _ = points()
    a, b = tiny_diffusion(ema_decay=0.5), tiny_diffusion(ema_decay=0.5)
    fit(a, x, steps=3, batch_size=32, out=tmp_path / "run", progress=False)
    fit(b, x, steps=3, batch_size=32, out=None, progress=False)  # no run directory: the EMA is not lost
    saved = load(tmp_path / "run")
    want = saved.sample(6, seed=3, steps=3)
    torch.testing.assert_close(a.sample(6, seed=3, steps=3), want, rtol=0, atol=0)
    torch.testing.assert_close(b.sample(6, seed=3, steps=3), want, rtol=0, atol=0)
    raw = load(tmp_path / "run", ema=False).sample(6, seed=3, steps=3)
    assert not torch.allclose(raw, want)  # decay 0.5 over 3 steps: the EMA is not the raw weights


# ---- A4: --no-ema for a GAN ---------------------------------------------------------------------------


def test_gan_load_without_ema_samples_the_trained_generator(tmp_path):
    torch.manual_seed(0)
    gan = GAN((2,), z_dim=4, g_hidden=16, d_hidden=16, ema_decay=0.5)
    fit(gan, points()[0], steps=3, batch_size=32, out=tmp_path / "run", progress=False)
    ema, raw = load(tmp_path / "run"), load(tmp_path / "run", ema=False)
    torch.testing.assert_close(ema.sample(5, seed=1), ema.sample(5, seed=1, ema=True), rtol=0, atol=0)
    torch.testing.assert_close(raw.sample(5, seed=1), ema.sample(5, seed=1, ema=False), rtol=0, atol=0)
    assert not torch.allclose(raw.sample(5, seed=1), ema.sample(5, seed=1))
    # the sampling job: --no-ema samples the trained generator
    out = sample_to_dir(tmp_path / "run", 5, tmp_path / "s", ema=False, progress=False, grid=False)
    from pygen.sampling import SampleDir

    assert out["ema"] is False
    torch.testing.assert_close(SampleDir(tmp_path / "s").read(0, 5), raw.sample(5, seed=0), rtol=0, atol=1e-6)


# ---- A5: conditional VAE and Flow: sample without labels, evaluate with them -------------------------


@pytest.mark.parametrize("family", ["vae", "flow"])
def test_conditional_sample_without_labels_is_fixed_by_seed_and_index(family):
    torch.manual_seed(0)
    model = (VAE((2,), 2, likelihood="gaussian", hidden=16, num_classes=2) if family == "vae"
             else Flow("realnvp", (2,), hidden=8, n_layers=2, num_classes=2))
    a = model.sample(8, seed=4)
    torch.testing.assert_close(model.sample(3, seed=4, offset=5), a[5:], rtol=1e-5, atol=1e-6)
    from pygen.models.labels import sample_labels

    labels = sample_labels(None, 8, 2, seed=4)
    torch.testing.assert_close(model.sample(8, seed=4, labels=labels), a, rtol=1e-5, atol=1e-6)


def test_sampling_job_of_a_conditional_flow(tmp_path):
    x, labels = points()
    torch.manual_seed(0)
    flow = Flow("realnvp", (2,), hidden=8, n_layers=2, num_classes=2)
    fit(flow, (x, labels), steps=2, batch_size=32, out=tmp_path / "run", progress=False)
    m = sample_to_dir(tmp_path / "run", 10, tmp_path / "s", progress=False, grid=False)
    assert m["complete"]


@pytest.mark.parametrize("family", ["vae", "flow"])
def test_evaluate_gives_a_conditional_model_its_test_labels(family):
    from pygen.data import train_test
    from pygen.metrics import evaluate

    x, labels = points(400)
    data = Data(x, labels, "blobs")
    torch.manual_seed(0)
    model = (VAE((2,), 2, likelihood="gaussian", hidden=16, num_classes=2) if family == "vae"
             else Flow("realnvp", (2,), hidden=8, n_layers=2, num_classes=2)).eval()
    res = evaluate(model, data, n=50, kid_subsets=2, kid_subset_size=20)
    _, test = train_test(data)
    with torch.no_grad():
        if family == "flow":
            want = -model.log_prob(test.data, test.labels).mean()
            assert res["nll"] == pytest.approx(float(want), rel=1e-6)
        else:  # the IWAE bound given the labels is far better than a bound with labels swapped
            swapped = -model.log_likelihood(test.data, k=64, labels=1 - test.labels, seed=0).mean()
            assert math.isfinite(res["nll"]) and res["nll"] != pytest.approx(float(swapped), rel=1e-3)


# ---- A6: one bits/dim rule ----------------------------------------------------------------------------


def test_bits_per_dim_uses_the_models_quantisation():
    from pygen.data import load as load_data
    from pygen.metrics import evaluate

    data = load_data("digits16")
    torch.manual_seed(0)
    flow = Flow("realnvp", (1, 16, 16), bins=17, hidden=8, n_layers=2).eval()
    res = evaluate(flow, data, n=20, kid_subsets=2, kid_subset_size=10, n_reference=40)
    assert res["meta"]["bins"] == 17  # the model's config, as training used
    assert data.bins == 17 and load_data("digits").bins == 17 and load_data("two_moons").bins is None
    assert Flow.for_data(data).config["bins"] == data.bins  # what `pygen train flow` builds


# ---- A7: a seeded IWAE likelihood, independent of the batch size -----------------------------------


def test_iwae_is_seeded_and_per_example():
    torch.manual_seed(0)
    vae = VAE((1, 8, 8), 4, network="mlp", hidden=16).eval()
    x = torch.rand(12, 1, 8, 8).round()
    a = vae.log_likelihood(x, k=8, seed=5)
    torch.testing.assert_close(vae.log_likelihood(x, k=8, seed=5), a, rtol=0, atol=0)
    torch.testing.assert_close(vae.log_likelihood(x[4:9], k=8, seed=5, offset=4), a[4:9], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(vae.log_likelihood(x, k=8, seed=6), a)

    from pygen.metrics import evaluate

    data = Data(torch.rand(300, 1, 8, 8).round(), None, "coins")
    kw = dict(n=30, kid_subsets=2, kid_subset_size=10, iwae_k=4, features="pixels")
    r1 = evaluate(vae, data, batch_size=7, **kw)
    r2 = evaluate(vae, data, batch_size=500, **kw)
    assert r1["nll"] == pytest.approx(r2["nll"], rel=1e-5)  # was: unseeded, and the noise moved with the batch


# ---- A8: the GAN's logged R1 after a resume -------------------------------------------------------------


def test_gan_logged_r1_is_exact_after_resume(tmp_path):
    x = points()[0]

    def run(out: Path, steps: int, resume: bool = False) -> list[dict]:
        torch.manual_seed(0)
        gan = GAN((2,), z_dim=4, g_hidden=16, d_hidden=16, r1_gamma=1.0, r1_every=4)
        return fit(gan, x, steps=steps, batch_size=32, out=out, resume=resume, log_every=1, checkpoint_every=2,
                   progress=False)

    full = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4, resume=True)
    assert [r["r1"] for r in resumed] == [r["r1"] for r in full[2:]]
    assert resumed[0]["r1"] != 0.0


# ---- A9: torch.compile of the default call forms ----------------------------------------------------------


def test_ops_compile_fullgraph_without_backend():
    from pygen.ops import gaussian_kl, reparameterize_kl

    mu, lv = torch.randn(4, 3), torch.randn(4, 3)

    def f(mu, lv):
        z, kl = reparameterize_kl(mu, lv, seed=3)
        return z.sum() + gaussian_kl(mu, lv).sum()

    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(mu, lv), f(mu, lv))


@pytest.mark.parametrize("name", ["vae", "gan", "flow", "diffusion"])
def test_model_losses_compile_fullgraph(name):
    torch.manual_seed(0)
    model = {
        "vae": lambda: VAE((1, 8, 8), 4, network="mlp", hidden=16),
        "gan": lambda: GAN((1, 8, 8), z_dim=4, g_width=8, d_width=8),
        "flow": lambda: Flow("glow", (1, 8, 8), bins=17, levels=1, depth=1, hidden=8),
        "diffusion": lambda: Diffusion((1, 8, 8), width=8, mults=[1], blocks=1, attention=False),
    }[name]()
    x = torch.rand(8, 1, 8, 8).mul(16).round().div(16)
    model.setup(x)  # data-dependent initialisation (ActNorm) happens eagerly, as fit does
    kw = {"phase": "d"} if name == "gan" else {}
    loss = torch.compile(lambda b: model.loss(b, **kw)["loss"], fullgraph=True, backend="eager")(x)
    assert loss.isfinite()


@pytest.mark.parametrize("name", ["vae", "gan", "flow", "diffusion"])
def test_fit_compile_trains_every_family(name):
    torch.manual_seed(0)
    model = {
        "vae": lambda: VAE((2,), 2, likelihood="gaussian", hidden=16),
        "gan": lambda: GAN((2,), z_dim=4, g_hidden=16, d_hidden=16),
        "flow": lambda: Flow("realnvp", (2,), hidden=8, n_layers=2),
        "diffusion": lambda: tiny_diffusion(),
    }[name]()
    hist = fit(model, points()[0], steps=2, batch_size=32, compile=True, log_every=1, progress=False)
    assert all(math.isfinite(r["loss"]) for r in hist)
