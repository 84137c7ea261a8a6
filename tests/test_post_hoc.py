"""Post-hoc stages fitted when training ends (GenerativeModel.fit_post_hoc; the VAE's second
stage + variance calibration): what fit returns equals what load(run) gives, the training
state in the checkpoint stays as it was (resume, kill during the post-hoc fit), EMA and
best.pt, the seeded subset, and sample's renormalize default."""

import pytest
import torch

from pygen.models import load
from pygen.models.seeding import Stream, derive_seed
from pygen.models.vae import VAE
from pygen.train import fit
from pygen.train.callbacks import BestCheckpoint

from test_vae import blobs

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


X = blobs(300)


def vae(**kw) -> VAE:
    torch.manual_seed(0)
    opts = dict(latent_dim=4, likelihood="gaussian", gamma="running", network="mlp", hidden=32, post_hoc=True)
    return VAE((1, 8, 8), **{**opts, **kw})


def train(out, steps=20, model=None, **kw):
    model = vae() if model is None else model
    fit(model, X, steps=steps, batch_size=32, out=out, progress=False, eval_every=1000, checkpoint_every=10, **kw)
    return model


def test_fit_fits_the_stages_and_load_gives_the_same_model(tmp_path, capsys):
    m = train(tmp_path / "r")
    assert m.config["second_stage"] == {"kind": "gmm", "components": 10}
    assert float(m.var_scale) != 1.0
    loaded = load(tmp_path / "r")
    assert loaded.config == m.config
    torch.testing.assert_close(loaded.sample(50, seed=3), m.sample(50, seed=3), rtol=0, atol=0)
    # the samples are the second stage's, renormalised by the factor
    plain = m.decode(m.latents(50, seed=3))
    torch.testing.assert_close(m.sample(50, seed=3), m.renormalize_variance(plain), rtol=0, atol=0)
    # the training state in the file is the model as trained: its config has no second stage
    ckpt = torch.load(tmp_path / "r" / "ckpt-20.pt", weights_only=True)
    assert ckpt["config"]["second_stage"] is None and "gmm_means" not in ckpt["model"]
    assert ckpt["post_hoc"]["on_ema"] is False
    assert "post-hoc: a 10-component Gaussian mixture on Q(z) of 300 examples x 4 draws" not in capsys.readouterr().out


def test_progress_prints_what_was_fitted(tmp_path, capsys):
    fit(vae(), X, steps=5, batch_size=32, progress=True, eval_every=1000)
    out = capsys.readouterr().out
    assert "post-hoc: a 10-component Gaussian mixture on Q(z) of 300 examples x 4 draws, variance factor " in out


def test_post_hoc_off_fits_nothing(tmp_path):
    m = train(tmp_path / "r", model=vae(post_hoc=False))
    assert m.config["second_stage"] is None and float(m.var_scale) == 1.0
    assert "post_hoc" not in torch.load(tmp_path / "r" / "ckpt-20.pt", weights_only=True)
    assert VAE.for_data.__func__ is not None and VAE.data_defaults["post_hoc"] is True


def test_resume_after_the_end_continues_training_exactly(tmp_path):
    train(tmp_path / "a", steps=10)
    resumed = train(tmp_path / "a", steps=20, resume=True)  # no refusal: the file's config is the trained one
    straight = train(tmp_path / "b", steps=20)
    torch.testing.assert_close(resumed.sample(40, seed=1), straight.sample(40, seed=1), rtol=0, atol=0)
    torch.testing.assert_close(load(tmp_path / "a").sample(40, seed=1), straight.sample(40, seed=1), rtol=0, atol=0)


def test_a_kill_during_the_post_hoc_fit_is_redone_on_resume(tmp_path):
    straight = train(tmp_path / "a")
    file = tmp_path / "a" / "ckpt-20.pt"
    ckpt = torch.load(file, weights_only=True)
    del ckpt["post_hoc"]  # the state a kill between the last checkpoint and the rewrite leaves
    torch.save(ckpt, file)
    with pytest.raises(ValueError, match="no second stage fitted"):
        load(tmp_path / "a").sample(2, second_stage=True)
    again = train(tmp_path / "a", resume=True)
    torch.testing.assert_close(again.sample(40, seed=2), straight.sample(40, seed=2), rtol=0, atol=0)
    torch.testing.assert_close(load(tmp_path / "a").sample(40, seed=2), straight.sample(40, seed=2), rtol=0, atol=0)


def test_with_an_ema_the_stages_belong_to_the_ema_weights(tmp_path):
    m = train(tmp_path / "r", model=vae(ema_decay=0.9))
    ckpt = torch.load(tmp_path / "r" / "ckpt-20.pt", weights_only=True)
    assert ckpt["post_hoc"]["on_ema"] is True
    torch.testing.assert_close(ckpt["post_hoc"]["model"]["decoder.0.0.weight"], ckpt["ema"]["decoder.0.0.weight"])
    torch.testing.assert_close(load(tmp_path / "r").sample(30, seed=0), m.sample(30, seed=0), rtol=0, atol=0)
    raw = load(tmp_path / "r", ema=False)  # the raw weights: the stages were not fitted on them
    assert raw.config["second_stage"] is None and float(raw.var_scale) == 1.0
    torch.testing.assert_close(raw.decoder[0][0].weight, ckpt["model"]["decoder.0.0.weight"])


def test_without_an_ema_no_ema_still_gives_the_stages(tmp_path):
    m = train(tmp_path / "r")
    torch.testing.assert_close(load(tmp_path / "r", ema=False).sample(30, seed=0), m.sample(30, seed=0),
                               rtol=0, atol=0)  # fmt: skip


def test_best_checkpoint_gets_the_stages(tmp_path):
    held = blobs(64, seed=9)
    m = vae()
    fit(m, X, steps=20, batch_size=32, out=tmp_path / "r", progress=False, eval_every=5, eval_data=held,
        checkpoint_every=10, callbacks=[BestCheckpoint("eval/loss")])  # fmt: skip
    best = torch.load(tmp_path / "r" / "best.pt", weights_only=True)
    assert "post_hoc" in best
    assert "post_hoc" not in torch.load(tmp_path / "r" / "ckpt-20.pt", weights_only=True)  # load reads best.pt
    torch.testing.assert_close(load(tmp_path / "r").sample(30, seed=0), m.sample(30, seed=0), rtol=0, atol=0)


def test_the_subset_is_seeded_and_bounded(tmp_path):
    a, b = vae(), vae()
    assert a.fit_post_hoc(X, max_examples=100).startswith("a 10-component Gaussian mixture on Q(z) of 100 examples x 4 draws")
    b.fit_post_hoc(X, max_examples=100)
    torch.testing.assert_close(a.gmm_means, b.gmm_means, rtol=0, atol=0)
    c = vae()
    c.fit_post_hoc(X, max_examples=100, seed=1)
    assert not torch.equal(a.gmm_means, c.gmm_means)
    d = vae()
    d.fit_post_hoc(X[:2], components=10)  # fewer points than components: as many components as points
    assert d.config["second_stage"]["components"] == 8


def test_renormalize_defaults_to_whether_a_factor_was_calibrated():
    m = vae()
    raw = m.sample(20, seed=0)
    torch.testing.assert_close(m.sample(20, seed=0, renormalize=None), raw, rtol=0, atol=0)
    m.var_scale.fill_(1.5)
    torch.testing.assert_close(m.sample(20, seed=0), m.renormalize_variance(raw), rtol=0, atol=0)
    torch.testing.assert_close(m.sample(20, seed=0, renormalize=False), raw, rtol=0, atol=0)
    m.calibrate_variance(X, n=100)  # calibrating samples raw: the factor does not depend on the old one
    first = float(m.var_scale)
    m.calibrate_variance(X, n=100)
    assert float(m.var_scale) == first


def test_fit_passes_its_seed_and_its_data():
    m = train(None, seed=3)
    fresh = vae()
    fresh.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("gmm_") and k != "var_scale"},
                          strict=False)  # fmt: skip
    fresh.fit_post_hoc(X, seed=3)
    torch.testing.assert_close(fresh.gmm_means, m.gmm_means, rtol=0, atol=0)
    torch.testing.assert_close(fresh.var_scale, m.var_scale, rtol=0, atol=0)
    other = vae()
    other.load_state_dict(fresh.state_dict(), strict=False)
    other.fit_post_hoc(X, seed=0)
    assert not torch.equal(other.gmm_means, m.gmm_means)


def test_a_lazy_folder_decodes_only_the_subset(tmp_path):
    from PIL import Image

    import pygen.data
    from pygen.data.storage import ImageFiles

    for i in range(12):
        Image.fromarray((torch.rand(8, 8) * 255).to(torch.uint8).numpy(), mode="L").save(tmp_path / f"{i:02d}.png")
    lazy = pygen.data.load(tmp_path, lazy=True)
    assert isinstance(lazy.source, ImageFiles)
    read = []
    decode = lazy.source.decode
    lazy.source.decode = lambda p: read.append(p) or decode(p)
    m = vae()
    assert m.fit_post_hoc(lazy.source, max_examples=5).startswith("a 10-component Gaussian mixture on Q(z) of 5 examples")
    assert len(read) == 5


def test_the_default_subset_is_20000_examples_and_the_mixture_has_one_component_per_400():
    x = blobs(20001, seed=1)
    assert vae().fit_post_hoc(x).startswith("a 50-component Gaussian mixture on Q(z) of 20000 examples x 1 draws")
    assert vae().fit_post_hoc(x[:8399]).startswith("a 20-component Gaussian mixture on Q(z) of 8399 examples x 2 draws")
    assert vae().fit_post_hoc(x[:3000]).startswith("a 10-component")  # at least 10
    assert vae().fit_post_hoc(x[:3000], components=7).startswith("a 7-component")


def test_a_conditional_vae_fits_with_its_labels():
    y = torch.arange(len(X)) % 3
    m = vae(num_classes=3)
    m.fit_post_hoc((X, y), max_examples=100)  # the subset keeps each example's label
    keep = torch.randperm(len(X), generator=torch.Generator().manual_seed(derive_seed(0, Stream.POST_HOC)))[:100]
    ref = vae(num_classes=3)
    ref.fit_post_hoc((X[keep.sort().values], y[keep.sort().values]))
    torch.testing.assert_close(m.gmm_means, ref.gmm_means, rtol=0, atol=0)
    full = vae(num_classes=3)
    full.fit_post_hoc((X, y))  # no subset: the labels as given
    wrong = vae(num_classes=3)
    wrong.fit_post_hoc((X, (y + 1) % 3))
    assert not torch.equal(full.gmm_means, wrong.gmm_means)


def _reference(x: torch.Tensor, n: int, draws: int, calibrate: int) -> VAE:
    """What fit_post_hoc fits, spelled out: the seeded subset, the mixture, the calibration."""
    s = derive_seed(0, Stream.POST_HOC)
    if len(x) > n:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(s))[:n].sort().values]
    ref = vae()
    ref.fit_second_stage(x, "gmm", components=min(50, max(10, len(x) // 400)), draws=draws, seed=s)
    ref.calibrate_variance(x, n=calibrate, seed=s)
    return ref


@pytest.mark.parametrize("n, draws, calibrate", [(6667, 2, 6667), (20001, 1, 10000)])
def test_the_fit_spelled_out(n, draws, calibrate):
    """About 20000 latents: 20000 // n draws (6667 examples: 2, not 3); calibration on at most
    10000 samples; every step from the POST_HOC stream."""
    x = blobs(n, seed=2)
    m = vae()
    line = m.fit_post_hoc(x)
    ref = _reference(x, 20000, draws, calibrate)
    torch.testing.assert_close(m.gmm_means, ref.gmm_means, rtol=0, atol=0)
    torch.testing.assert_close(m.gmm_chol, ref.gmm_chol, rtol=0, atol=0)
    torch.testing.assert_close(m.var_scale, ref.var_scale, rtol=0, atol=0)
    assert f"of {min(n, 20000)} examples x {draws} draws, variance factor {float(m.var_scale):.4g} (" in line
    seconds = float(line.rsplit("(", 1)[1].split(" s)")[0])
    assert 0 <= seconds < 600
