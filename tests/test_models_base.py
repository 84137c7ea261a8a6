"""The model interface (pygen.models.base) and the Flow adapter: config, registry, save/load,
counter-based sampling, loss terms."""

import json
import math

import pytest
import torch

import pygen.models
from pygen.models import Flow, GenerativeModel, load
from pygen.train import fit


from test_train import moons  # noqa: E402  (the same toy data as the trainer tests)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py




def tiny(kind: str = "realnvp", **kw) -> Flow:
    torch.manual_seed(0)
    if kind == "glow":
        return Flow("glow", (1, 4, 4), levels=1, depth=1, hidden=8, **kw)
    return Flow(kind, (2,), hidden=16, n_layers=2, **kw)


def test_config_rebuilds_and_is_json():
    for kind in ("realnvp", "nsf", "glow"):
        m = tiny(kind, bins=17 if kind == "glow" else None)
        cfg = json.loads(json.dumps(m.config))
        rebuilt = type(m)(**cfg)
        assert rebuilt.config == m.config
        assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in m.parameters()]
    assert pygen.models.families()["flow"] is Flow


def test_registry_rejects_a_second_class_for_a_family():
    with pytest.raises(ValueError, match="already registered"):

        class Other(GenerativeModel, family="flow"):
            pass


def test_flow_loss_terms():
    m = tiny()
    terms = m.loss(moons(64))
    assert set(terms) == {"loss"} and terms["loss"].dim() == 0
    g = tiny("glow", bins=17)
    x = torch.randint(0, 17, (8, 1, 4, 4)) / 16
    terms = g.loss(x)
    assert set(terms) == {"loss", "bpd"}
    # bpd is the loss (nats per example, discrete bound) in bits per dimension
    assert torch.allclose(terms["bpd"], terms["loss"] / (16 * math.log(2)))
    with pytest.raises(ValueError, match="x in \\[0, 1\\]"):
        g.loss(x * 3)


@pytest.mark.parametrize("kind", ["realnvp", "nsf", "glow"])
def test_sample_depends_on_seed_and_index_only(kind):
    m = tiny(kind, bins=17 if kind == "glow" else None).eval()
    m.setup(torch.rand(16, *m.data_shape) if kind == "glow" else moons(16))  # ActNorm init: not identity
    full = m.sample(16, seed=3)
    assert full.shape == (16, *m.data_shape)
    torch.testing.assert_close(m.sample(8, seed=3), full[:8], atol=1e-6, rtol=0)
    torch.testing.assert_close(m.sample(8, seed=3, offset=8), full[8:], atol=1e-6, rtol=0)
    torch.testing.assert_close(m.sample(1, seed=3, offset=5), full[5:6], atol=1e-6, rtol=0)
    assert not torch.equal(m.sample(8, seed=4), full[:8])
    if kind == "glow":  # quantised back to the data's levels k / 16 in [0, 1]
        assert full.min() >= 0 and full.max() <= 1
        assert torch.equal(full * 16, (full * 16).round())


def test_sample_generator_and_conditional():
    m = tiny(num_classes=3).eval()
    a = m.sample(4, generator=torch.Generator().manual_seed(1), labels=2)
    b = m.sample(4, generator=torch.Generator().manual_seed(1), labels=torch.full((4,), 2))
    assert torch.equal(a, b)
    # no labels: random ones fixed by (seed, index) like the latents (issue 17 A5)
    torch.testing.assert_close(m.sample(4, seed=0), m.sample(8, seed=0)[:4])
    torch.testing.assert_close(m.sample(4, seed=0, offset=4), m.sample(8, seed=0)[4:])
    with pytest.raises(ValueError, match="pass labels"):
        m.log_prob(moons(4))  # a conditional likelihood needs the labels
    labels = torch.tensor([0, 1, 2, 0])
    assert m.loss((moons(4), labels))["loss"].isfinite()


def test_save_load_file_and_directory(tmp_path):
    x = moons(256)
    m = tiny(ema_decay=0.5)
    fit(m, x, steps=3, batch_size=64, out=tmp_path / "run", progress=False)
    m.save(tmp_path / "flow.pt")
    assert not list(tmp_path.glob(".tmp-*"))
    from_file = load(tmp_path / "flow.pt")
    assert type(from_file) is Flow and not from_file.training and from_file.config == m.config
    torch.testing.assert_close(from_file.log_prob(x), m.log_prob(x), rtol=0, atol=0)
    # a training directory: its latest checkpoint, EMA weights by default, which is what the
    # model holds after fit (issue 17 A3)
    ema = load(tmp_path / "run")
    torch.testing.assert_close(ema.log_prob(x), m.log_prob(x), rtol=0, atol=0)
    raw = load(tmp_path / "run", ema=False)
    assert not torch.equal(raw.log_prob(x), m.log_prob(x))  # decay 0.5 over 3 steps: not the raw weights
    ckpt = torch.load(tmp_path / "run" / "ckpt-3.pt", weights_only=True)
    for name, v in ema.state_dict().items():
        assert torch.equal(v, ckpt["ema"][name])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        load(tmp_path / "empty")


def test_load_unknown_family(tmp_path):
    torch.save({"family": "nope", "config": {}, "model": {}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="unknown model family 'nope'"):
        load(tmp_path / "x.pt")
