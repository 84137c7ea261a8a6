"""Latent diffusion (issue 18, item 6): the autoencoder stage, the switch to the diffusion
stage, sampling, guidance and inpainting through the decoder, files, resume and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pygen.models import Diffusion, LatentDiffusion, families, load
from pygen.models.autoencoder import KLAutoencoder, l1_per_example
from pygen.models.base import meta_bytes
from pygen.train import fit

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"width": 8, "mults": [1, 2], "blocks": 1, "attention": False, "ae_width": 4}


def _data(n: int = 16, shape=(1, 12, 12), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g), torch.randint(0, 3, (n,), generator=g)


def _model(shape=(1, 12, 12), **kw) -> LatentDiffusion:
    torch.manual_seed(0)
    return LatentDiffusion(shape, **{"num_classes": 3, "ae_steps": 2, **TINY, **kw})


@pytest.mark.parametrize("shape,latent", [((1, 28, 28), (4, 7, 7)), ((3, 32, 32), (4, 8, 8)),
                                          ((3, 24, 40), (4, 6, 10)), ((1, 17, 17), (4, 5, 5)),
                                          ((4, 9, 12), (4, 3, 3))])
def test_autoencoder_maps_any_shape_to_a_latent_a_quarter_each_side(shape, latent):
    ae = KLAutoencoder(shape)
    x = torch.rand(2, *shape)
    z, kl = ae.encode(x)
    assert z.shape == (2, *latent) and kl.shape == (2,)
    assert ae.decode(z).shape == (2, *shape)


def test_the_autoencoder_stage_loss_is_l1_plus_weighted_kl():
    m = _model(kl_weight=0.25)
    x, y = _data()
    with torch.random.fork_rng():
        out = m.loss((x, y))
    rec, kl = m.autoencoder(x)  # the same draw: torch's generator is where it was
    l1 = l1_per_example(rec, x)
    torch.testing.assert_close(l1, (rec - x).abs().flatten(1).sum(1))
    torch.testing.assert_close(out["loss"], (l1 + 0.25 * kl).mean())
    torch.testing.assert_close(out["l1"], (rec - x).abs().mean())
    torch.testing.assert_close(out["kl"], kl.mean())


def test_stage_two_starts_at_ae_steps_with_unit_variance_latents_and_freezes_the_autoencoder():
    m = _model()
    x, y = _data(32)
    opts = m.configure_optimizers()
    ae0 = {k: v.clone() for k, v in m.autoencoder.state_dict().items()}
    dm0 = {k: v.clone() for k, v in m.diffusion.state_dict().items()}
    for step in range(2):  # stage 1: only the autoencoder moves
        m.training_step((x, y), step, opts)
        assert int(m.stage) == 0
    assert any(not torch.equal(v, ae0[k]) for k, v in m.autoencoder.state_dict().items())
    assert all(torch.equal(v, dm0[k]) for k, v in m.diffusion.state_dict().items())
    ae1 = {k: v.clone() for k, v in m.autoencoder.state_dict().items()}
    with torch.random.fork_rng():
        z = m.autoencoder.encode(x)[0]
    m.training_step((x, y), 2, opts)
    assert int(m.stage) == 1
    torch.testing.assert_close(m.latent_scale, 1 / z.std(), rtol=1e-6, atol=0)
    with torch.random.fork_rng():
        assert abs(float(m.latents(x).std()) - 1) < 0.05  # unit variance, up to the new draw
    m.training_step((x, y), 3, opts)
    assert all(torch.equal(v, ae1[k]) for k, v in m.autoencoder.state_dict().items())  # frozen
    assert any(not torch.equal(v, dm0[k]) for k, v in m.diffusion.state_dict().items())
    assert int(m.diffusion_ema.n_averaged) == 2  # one EMA update per diffusion step, none before


def test_stage_two_loss_is_the_diffusion_loss_of_the_scaled_latents():
    m = _model()
    x, y = _data()
    m.start_diffusion((x, y))
    m.latent_scale.fill_(0.5)
    with torch.random.fork_rng():
        got = m.loss((x, y))["loss"]
    z = m.latents(x)
    want = m.diffusion.loss((z, y))["loss"]
    torch.testing.assert_close(got, want)
    with torch.random.fork_rng():
        z1 = m.latents(x)
    torch.testing.assert_close(z1, 0.5 * m.autoencoder.encode(x)[0])


def test_a_short_run_gives_the_autoencoder_at_most_half_of_it_and_the_diffusion_model_the_rest():
    m = _model(ae_steps=800)
    assert [m.stage_steps_for(s) for s in (1, 2, 3, 7, 1599, 1600, 10**6)] == [0, 1, 1, 3, 799, 800, 800]


def test_the_first_stage_probe_trains_only_the_autoencoder_on_a_copy():
    m = _model(ae_steps=5)
    n, probe = m.first_stage_probe()
    assert n == 5 and m.ae_steps == 5 and probe is not m
    assert all(p is not q for p, q in zip(probe.parameters(), m.parameters()))
    opts = probe.configure_optimizers()
    batch = _data(4)
    before = [p.clone() for p in probe.diffusion.parameters()]
    for step in range(10):  # past this model's 5 autoencoder steps: still the autoencoder
        out = probe.training_step(batch, step, opts)
    assert "l1" in out and int(probe.stage) == 0 and int(m.stage) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, probe.diffusion.parameters()))


def test_the_step_probe_times_the_diffusion_stage_on_a_copy():
    m = _model(ae_steps=5)
    probe = m.probe_copy()
    assert probe.ae_steps == 0 and m.ae_steps == 5 and probe is not m
    assert all(p is not q for p, q in zip(probe.parameters(), m.parameters()))


def test_samples_depend_on_seed_and_index_only_and_stay_in_range():
    m = _model()
    x, y = _data()
    fit(m, (x, y), steps=4, batch_size=8, progress=False)
    a = m.sample(6, seed=3, steps=3)
    assert a.shape == (6, 1, 12, 12) and 0 <= a.min() and a.max() <= 1
    torch.testing.assert_close(m.sample(3, seed=3, steps=3), a[:3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.sample(3, seed=3, steps=3, offset=3), a[3:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.sample(6, seed=3, steps=3, batch_size=4), a, rtol=1e-5, atol=1e-6)
    assert not torch.equal(m.sample(6, seed=4, steps=3), a)
    assert m.sample(0, seed=3, steps=3).shape == (0, 1, 12, 12)
    # the latents come from the diffusion model's sampler and are decoded by the decoder
    z = m.denoiser().sample(6, seed=3, steps=3)
    torch.testing.assert_close(a, m.decode(z))
    torch.testing.assert_close(m.decode(z), m.autoencoder.decode(z / m.latent_scale).clamp(0, 1))


def test_ema_is_what_samples_unless_told_otherwise(tmp_path):
    m = _model()
    x, y = _data()
    fit(m, (x, y), steps=5, batch_size=8, out=tmp_path / "run", progress=False)
    assert m.denoiser() is m.diffusion_ema.module and m.denoiser(ema=False) is m.diffusion
    raw = m.sample(4, seed=1, steps=2, ema=False)
    assert not torch.equal(raw, m.sample(4, seed=1, steps=2))
    assert torch.equal(load(tmp_path / "run", ema=False).sample(4, seed=1, steps=2), raw)
    torch.testing.assert_close(load(tmp_path / "run").sample(4, seed=1, steps=2), m.sample(4, seed=1, steps=2))
    with pytest.raises(ValueError, match="no EMA"):
        _model(ema_decay=None).sample(2, seed=0, steps=2, ema=True)


def test_guidance_and_labels_reach_the_latent_sampler():
    m = _model()
    x, y = _data()
    fit(m, (x, y), steps=4, batch_size=8, progress=False)
    for kw in ({"labels": 2}, {"labels": torch.tensor([0, 1, 2])}, {"labels": 1, "guidance_scale": 3.0}):
        want = m.decode(m.denoiser().sample(3, seed=2, steps=2, **kw))
        torch.testing.assert_close(m.sample(3, seed=2, steps=2, **kw), want)
    assert not torch.equal(m.sample(3, seed=2, steps=2, labels=1, guidance_scale=3.0),
                           m.sample(3, seed=2, steps=2, labels=1))
    assert m.sample_settings(steps=7) == m.diffusion.sample_settings(steps=7)


def test_inpainting_keeps_the_known_pixels_and_fills_the_rest():
    m = _model()
    x, y = _data()
    fit(m, (x, y), steps=4, batch_size=8, progress=False)
    mask = torch.ones(1, 1, 12, 12)
    mask[..., 6:, :] = 0
    out = m.inpaint(x[:2], mask, n=3, seed=0, steps=4, jump_length=2, jump_n_sample=2)
    assert out.shape == (2, 3, 1, 12, 12)
    assert torch.equal(out[:, :, :, :6], x[:2, None, :, :6].expand(2, 3, 1, 6, 12))
    assert not torch.equal(out[:, 0, :, 6:], out[:, 1, :, 6:])  # completions differ
    full = m.inpaint(x[:2], torch.ones(1, 1, 12, 12), n=1, seed=0, steps=2)
    assert torch.equal(full[:, 0], x[:2])


def test_the_logged_lr_is_the_stage_s_own():
    """Stage 1 steps the autoencoder's Adam (ae_lr), stage 2 the diffusion model's (the run's lr):
    metrics.jsonl names the one that stepped, not the first optimizer's."""
    x, y = _data(16)
    hist = fit(_model(ae_lr=3e-3), (x, y), steps=4, batch_size=8, lr=7e-4, log_every=1, progress=False, seed=1)
    assert [r["lr"] for r in hist] == [3e-3, 3e-3, 7e-4, 7e-4]


def test_resume_across_the_stage_switch_is_exact(tmp_path):
    x, y = _data(32)
    a = _model()
    fit(a, (x, y), steps=5, batch_size=8, out=tmp_path / "a", progress=False, seed=1)
    b = _model()
    fit(b, (x, y), steps=2, batch_size=8, out=tmp_path / "b", progress=False, seed=1, checkpoint_every=1)
    b = _model()
    fit(b, (x, y), steps=5, batch_size=8, out=tmp_path / "b", progress=False, seed=1, resume=True)
    sa, sb = load(tmp_path / "a").state_dict(), load(tmp_path / "b").state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_save_load_and_meta_sizing():
    m = _model((3, 16, 20))
    real = sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))
    assert meta_bytes(lambda: LatentDiffusion((3, 16, 20), **{"num_classes": 3, "ae_steps": 2, **TINY})) == real
    assert families()["latent-diffusion"] is LatentDiffusion
    assert isinstance(m.diffusion, Diffusion) and m.diffusion.shape == (4, 4, 5)


@pytest.mark.parametrize("bad,match", [({"ae_steps": -1}, "ae_steps"), ({"kl_weight": -1.0}, "kl_weight"),
                                       ({"ema_decay": 1.0}, "ema_decay"), ({"levels": 4}, "levels")])
def test_bad_arguments_name_themselves(bad, match):
    with pytest.raises(ValueError, match=match):
        LatentDiffusion((1, 12, 12), **bad)
    with pytest.raises(ValueError, match="images"):
        LatentDiffusion((5,))
    with pytest.raises(ValueError, match=r"batch must be \(B, 1, 12, 12\)"):
        _model().loss((torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)))


def test_cli_trains_samples_and_evaluates_a_latent_diffusion_run(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pygen"]
    tr = subprocess.run([*cmd, "train", "latent-diffusion", "--data", "digits", "--steps", "6", "--batch-size", "32",
                         "--out", str(run), "--no-progress"], capture_output=True, text=True)
    assert tr.returncode == 0, tr.stderr
    record = json.loads((run / "train.json").read_text())
    assert record["family"] == "latent-diffusion"
    assert record["options"]["ae_steps"] == 3  # a short run: the autoencoder gets half of it
    model = load(run)
    assert isinstance(model, LatentDiffusion) and int(model.stage) == 1 and model.num_classes == 10
    sa = subprocess.run([*cmd, "sample", str(run), "-n", "6", "--steps", "2", "--out", str(tmp_path / "s")],
                        capture_output=True, text=True)
    assert sa.returncode == 0, sa.stderr
    ev = subprocess.run([*cmd, "eval", str(run), "--data", "digits", "--n", "50", "--json",
                         str(tmp_path / "e.json")], capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr
    assert json.loads((tmp_path / "e.json").read_text())["fd"] > 0


@pytest.mark.parametrize("pixel", [False, True])
def test_diffusion_of_28px_images_on_the_cpu_is_latent_unless_pixel(tmp_path, pixel):
    import numpy as np

    g = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=g.integers(0, 256, (40, 28, 28), dtype=np.uint8))
    run = tmp_path / "run"
    args = [sys.executable, "-m", "pygen", "train", "diffusion", "--data", str(tmp_path / "d.npz"), "--steps", "2",
            "--batch-size", "8", "--out", str(run), "--no-progress", "--device", "cpu"]
    tiny = ["--option", "width=8", "--option", "mults=[1]", "--option", "blocks=1", "--option", "attention=false"]
    r = subprocess.run([*args, *tiny, *(["--pixel"] if pixel else ["--option", "ae_steps=1"])], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    family = "diffusion" if pixel else "latent-diffusion"
    assert json.loads((run / "train.json").read_text())["family"] == family
    assert load(run).family == family
    assert ("latent diffusion" in r.stdout) is not pixel
    r = subprocess.run([*args[:7], "--steps", "3", "--out", str(run), "--resume", "--no-progress"],
                       capture_output=True, text=True)  # a resume stays in its space
    assert r.returncode == 0, r.stderr
    assert load(run).family == family


@pytest.mark.parametrize("args,needle", [
    (["latent-diffusion", "--data", "two_moons", "--pixel"], "--pixel is an option of diffusion, not of latent-diffusion"),
    (["latent-diffusion", "--data", "two_moons"], "latent diffusion needs (C, H, W) images"),
])
def test_mistakes_are_one_line_and_exit_2(tmp_path, args, needle):
    r = subprocess.run([sys.executable, "-m", "pygen", "train", *args, "--out", str(tmp_path / "run"), "--steps", "2"],
                       capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr
    assert not (tmp_path / "run").exists()


def test_sampling_job_compiles_the_denoisers_and_samples_the_same_up_to_rounding(tmp_path):
    import numpy as np

    from pygen.models import VAE
    from pygen.models.inference import compile_denoisers
    from pygen.sampling import SamplingError, sample_to_dir

    m = _model()
    x, y = _data()
    fit(m, (x, y), steps=4, batch_size=8, out=tmp_path / "run", progress=False)
    kw = {"batch_size": 4, "steps": 2, "progress": False, "grid": False}
    plain = sample_to_dir(tmp_path / "run", 4, tmp_path / "plain", **kw)
    sample_to_dir(tmp_path / "run", 4, tmp_path / "compiled", compile=True, **kw)

    def shards(d):
        return np.concatenate([np.load(tmp_path / d / s["file"])["samples"] for s in plain["shards"]])

    np.testing.assert_allclose(shards("compiled"), shards("plain"), rtol=0, atol=1e-4)
    assert compile_denoisers(_model()) == 2  # the diffusion model and its EMA
    VAE((1, 12, 12), 2, network="mlp", hidden=8).save(tmp_path / "vae.pt")
    with pytest.raises(SamplingError, match="--compile compiles diffusion networks; .* holds a vae model"):
        sample_to_dir(tmp_path / "vae.pt", 4, tmp_path / "v", compile=True, **kw)
    assert not (tmp_path / "v").exists()
