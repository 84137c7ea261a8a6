"""pygen.train.fit: learning, checkpoints (complete, atomic), exact resume, divergence,
data forms, evaluation and the metrics log, and a 2-process torchrun run."""

import io
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import pygen.train.checkpoint
from pygen.models import Flow, GenerativeModel, load
from pygen.ops import randn
from pygen.train import BatchOrder, TrainingDiverged, fit

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


def moons(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 2) two-moons-like data, standardised."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * math.pi
    upper = torch.rand(n, generator=g) < 0.5
    x = torch.where(upper[:, None], torch.stack([t.cos(), t.sin()], 1), torch.stack([1 - t.cos(), 0.5 - t.sin()], 1))
    x = x + 0.05 * torch.randn(n, 2, generator=g)
    return (x - x.mean(0)) / x.std(0)


def quantised_moons(n: int, bins: int = 17) -> torch.Tensor:
    """Moons squashed into [0, 1] and quantised to levels k / (bins - 1)."""
    x = moons(n)
    x = (x - x.min(0).values) / (x.max(0).values - x.min(0).values)
    return torch.round(x * (bins - 1)) / (bins - 1)


def tiny_flow(**kw) -> Flow:
    torch.manual_seed(0)
    return Flow("realnvp", (2,), hidden=16, n_layers=2, **kw)


class Quadratic(GenerativeModel, family="test-quadratic"):
    """A toy family with the default hooks: N(w, I); its loss turns NaN from call ``nan_at``."""

    def __init__(self, dim: int = 2, nan_at: int | None = None) -> None:
        super().__init__()
        self.config = {"dim": dim, "nan_at": nan_at}
        self.w = nn.Parameter(torch.zeros(dim))
        self.nan_at, self.calls = nan_at, 0

    def loss(self, batch):
        x = batch[0] if isinstance(batch, tuple) else batch
        self.calls += 1
        loss = ((x - self.w) ** 2).sum(1).mean() / 2
        if self.nan_at is not None and self.calls >= self.nan_at:
            loss = loss * float("nan")
        return {"loss": loss}

    def sample(self, n, *, seed=None, generator=None, offset=0):
        d = self.w.numel()
        return randn(n, d, seed=seed, generator=generator, offset=offset * d) + self.w.detach()


class ScheduledFlow(Flow, family="test-scheduled-flow"):
    """A Flow with an LR scheduler, to check that schedulers are checkpointed and resumed."""

    def configure_optimizers(self, lr=None):
        opt = torch.optim.Adam(self.parameters(), lr=1e-2 if lr is None else lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)]


def test_loss_decreases_on_two_moons():
    x, held_out = moons(1024), moons(512, seed=1)
    torch.manual_seed(0)
    m = Flow("realnvp", (2,), hidden=32, n_layers=4)
    hist = fit(m, x, steps=200, batch_size=128, lr=1e-2, eval_data=held_out, eval_every=20, log_every=20, progress=False)
    evals = [r["eval/loss"] for r in hist if "eval/loss" in r]
    assert len(evals) == 10
    # a standard normal fit to standardised data has NLL log(2 pi e) = 2.84 nats
    # the first evaluation (step 20) is already partly trained and its value differs with the
    # CPU's float rounding (AVX2 vs AVX-512); the bar is the standard normal's 2.84
    assert evals[-1] < evals[0] - 0.2 and evals[-1] < 2.5, evals
    assert all(r["steps_per_s"] > 0 and r["samples_per_s"] == pytest.approx(128 * r["steps_per_s"]) for r in hist)


def test_checkpoint_contents_complete(tmp_path):
    torch.manual_seed(0)
    m = ScheduledFlow("realnvp", (2,), bins=17, ema_decay=0.9, hidden=16, n_layers=2)
    hist = fit(m, quantised_moons(64), steps=4, batch_size=16, out=tmp_path, checkpoint_every=1, log_every=2, progress=False)
    # keep=2: only the two newest survive; latest names the newest
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt")) == ["ckpt-3.pt", "ckpt-4.pt"]
    assert (tmp_path / "latest").read_text().strip() == "ckpt-4.pt"
    assert not list(tmp_path.glob(".tmp-*"))
    ckpt = torch.load(tmp_path / "ckpt-4.pt", weights_only=True)
    assert set(ckpt) == {"family", "config", "model", "ema", "ema_n_averaged", "optimizers", "schedulers", "scaler",
                         "callbacks", "step", "rng", "train", "versions"}
    assert ckpt["family"] == "test-scheduled-flow" and ckpt["config"] == m.config and ckpt["step"] == 4
    for name, v in m.state_dict().items():  # after fit the model holds the EMA weights, as load(out) gives
        assert torch.equal(ckpt["ema"][name], v)
    assert set(ckpt["ema"]) == set(ckpt["model"]) and ckpt["ema_n_averaged"] == 4
    opt = ckpt["optimizers"][0]
    assert len(opt["state"]) == len(list(m.parameters())) and int(opt["state"][0]["step"]) == 4
    assert ckpt["schedulers"][0]["last_epoch"] == 4 and ckpt["schedulers"][0]["_last_lr"] == [5e-3]
    (rng,) = ckpt["rng"]  # one entry per rank
    assert {"torch", "numpy", "python"} <= set(rng) and rng["torch"].dtype == torch.uint8
    assert ckpt["train"] == {"seed": 0, "batch_size": 16, "world_size": 1, "steps": 4, "grad_accum": 1, "precision": "fp32",
                             "lr_schedule": "constant", "warmup": 0, "weight_decay": None}
    assert ckpt["scaler"] is None and ckpt["callbacks"] == []
    assert set(ckpt["versions"]) == {"pygen", "torch"}
    # the metrics log is the history
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == hist and [r["step"] for r in hist] == [2, 4] and {"loss", "bpd", "lr"} <= set(hist[0])


def test_checkpoint_atomic_under_a_crash_while_writing(tmp_path, monkeypatch):
    x = moons(64)
    real_save, calls = torch.save, []

    def crashing_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) < 2:
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # half a file on disk, then the "kill"
        raise KeyboardInterrupt("simulated kill while writing ckpt-4")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_flow(), x, steps=4, batch_size=16, out=tmp_path, checkpoint_every=2, progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "latest").read_text().strip() == "ckpt-2.pt"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["ckpt-2.pt", "latest"]
    assert torch.load(tmp_path / "ckpt-2.pt", weights_only=True)["step"] == 2
    assert load(tmp_path).config == tiny_flow().config
    # a real kill leaves the temp file behind: it is never read, and removed on the next start
    (tmp_path / ".tmp-ckpt-4.pt.x").write_bytes(b"half a checkpoint")
    fit(tiny_flow(), x, steps=4, batch_size=16, out=tmp_path, checkpoint_every=2, progress=False, resume=True)
    assert (tmp_path / "latest").read_text().strip() == "ckpt-4.pt" and not list(tmp_path.glob(".tmp-*"))


def _assert_same_state(a: dict, b: dict, path: str = "") -> None:
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same_state(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            _assert_same_state(u, v, f"{path}/{i}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def test_exact_resume_is_bitwise(tmp_path):
    # quantised data: the dequantisation noise comes from torch's RNG, so its state must resume too;
    # 64 examples in batches of 24: batches straddle epochs
    x = quantised_moons(64)

    def run(out, steps, resume=False):
        torch.manual_seed(0)  # fit seeds the training streams, not the initialisation
        m = ScheduledFlow("realnvp", (2,), bins=17, ema_decay=0.9, hidden=16, n_layers=2)
        fit(m, x, steps=steps, batch_size=24, out=out, resume=resume, checkpoint_every=5, log_every=1, progress=False)
        return m

    whole = run(tmp_path / "a", 10)
    run(tmp_path / "b", 5)
    resumed = run(tmp_path / "b", 10, resume=True)
    for (name, p), q in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    a = torch.load(tmp_path / "a" / "ckpt-10.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt-10.pt", weights_only=True)
    for key in ("model", "ema", "ema_n_averaged", "optimizers", "schedulers", "step", "rng"):
        _assert_same_state(a[key], b[key], key)
    # the log of the resumed run continues the first part's: one record per step
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))


def test_resume_refuses_another_config_and_fresh_runs_refuse_a_run_dir(tmp_path):
    x = moons(64)
    fit(tiny_flow(), x, steps=2, batch_size=16, out=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"cannot resume .*differs in \['hidden'\]"):
        fit(Flow("realnvp", (2,), hidden=8, n_layers=2), x, steps=4, batch_size=16, out=tmp_path, resume=True, progress=False)
    with pytest.raises(FileExistsError, match="resume=True"):
        fit(tiny_flow(), x, steps=4, batch_size=16, out=tmp_path, progress=False)
    with pytest.warns(UserWarning, match="batch_size=32"):
        fit(tiny_flow(), x, steps=3, batch_size=32, out=tmp_path, resume=True, progress=False)
    # resume=True on a directory without a checkpoint starts the run
    assert fit(Quadratic(), x, steps=2, batch_size=16, out=tmp_path / "new", resume=True, progress=False)[-1]["step"] == 2


def test_divergence_names_the_step_and_last_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"non-finite .* at training step 5; last good checkpoint: .*ckpt-4\.pt") as e:
        fit(Quadratic(nan_at=5), moons(64), steps=10, batch_size=16, out=tmp_path, checkpoint_every=2, progress=False)
    assert e.value.step == 5 and e.value.checkpoint == tmp_path / "ckpt-4.pt"
    assert isinstance(e.value, FloatingPointError)
    with pytest.raises(TrainingDiverged, match="none"):
        fit(Quadratic(nan_at=1), moons(64), steps=3, batch_size=16, progress=False)


def test_batches_are_a_pure_function_of_seed_and_step():
    a, b = BatchOrder(10, 4, seed=7), BatchOrder(10, 4, seed=7)
    for k in (3, 0, 4, 1, 2):  # any order: no running state
        assert torch.equal(a.indices(k), b.indices(k))
    stream = torch.cat([a.indices(k) for k in range(5)])  # 20 positions = epochs 0 and 1
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:]) and not torch.equal(BatchOrder(10, 4, seed=8).indices(0), a.indices(0))


@dataclass
class LabelledData:  # the shape of pygen.data's data sets: tensor fields
    data: torch.Tensor
    labels: torch.Tensor


def test_data_forms_grad_clip_and_eval(tmp_path):
    x, y = moons(64), torch.arange(64) % 3
    ref = fit(Quadratic(), x, steps=3, batch_size=16, log_every=1, progress=False)
    for data in ((x, y), LabelledData(x, y), torch.utils.data.TensorDataset(x, y), torch.utils.data.TensorDataset(x)):
        hist = fit(Quadratic(), data, steps=3, batch_size=16, log_every=1, progress=False)
        assert [r["loss"] for r in hist] == [r["loss"] for r in ref]
    m = tiny_flow(num_classes=3, ema_decay=0.9)
    hist = fit(m, LabelledData(x, y), steps=4, batch_size=16, grad_clip=1e-3, eval_data=(x, y), eval_every=2, log_every=2, progress=False)
    assert all(r["grad_norm"] > 1e-3 for r in hist)  # before clipping
    assert {"eval/loss", "eval_ema/loss"} <= set(hist[0]) and hist[0]["eval/loss"] != hist[0]["eval_ema/loss"]
    with pytest.raises(ValueError, match="labels"):
        fit(Quadratic(), (x, y[:10]), steps=1, batch_size=16, progress=False)


def test_compile_smoke():
    hist = fit(Quadratic(), moons(64), steps=3, batch_size=16, compile="aot_eager", log_every=1, progress=False)
    ref = fit(Quadratic(), moons(64), steps=3, batch_size=16, log_every=1, progress=False)
    assert [r["loss"] for r in hist] == pytest.approx([r["loss"] for r in ref], rel=1e-6)


DDP_SCRIPT = '''
import os, sys, torch
from pygen.models import Flow
from pygen.train import fit

def make_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 2, generator=g)
    return torch.stack([x[:, 0], 0.5 * x[:, 0] ** 2 + 0.3 * x[:, 1]], 1)

class SGDFlow(Flow, family="test-sgd-flow"):
    # SGD: Adam's first update is about lr * sign(g), so a gradient that is 0 up to rounding
    # (1e-8 either way) moves a weight by +-lr: Adam cannot show that two runs agree to 1e-6
    def configure_optimizers(self, lr=None):
        return [torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9)]

def make_model():
    torch.manual_seed(0)
    return SGDFlow("realnvp", (2,), hidden=16, n_layers=2)

STEPS, BATCH = 6, 32

if __name__ == "__main__":
    out, dump = sys.argv[1], sys.argv[2]
    model = make_model()
    hist = fit(model, make_data(), steps=STEPS, batch_size=BATCH, lr=0.05, out=out, log_every=1, checkpoint_every=3, progress=False)
    torch.save({"state": model.state_dict(), "history": hist}, os.path.join(dump, f"rank{os.environ['RANK']}.pt"))
'''


def test_torchrun_two_processes_match_one(tmp_path):
    """2 CPU ranks (gloo), each with half of every global batch of 32, vs one process with the whole batch.

    Asserted: both ranks end with identical weights (DDP all-reduces the gradients), rank 0
    wrote the checkpoints with both ranks' RNG states, the loss decreased, and the weights
    equal the single-process run's to 1e-6: the gradient mean over two halves equals the mean
    over the batch up to float rounding (not bitwise: the sum order differs). The model
    trains with SGD here (see SGDFlow in the script: Adam would turn rounding noise in
    near-zero gradients into +-lr steps).
    """
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    out, dump = tmp_path / "out", tmp_path / "dump"
    dump.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", str(script), str(out), str(dump)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    r0, r1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name, v in r0["state"].items():
        assert torch.equal(v, r1["state"][name]), name
    assert (out / "latest").read_text().strip() == "ckpt-6.pt" and (out / "ckpt-3.pt").exists()
    ckpt = torch.load(out / "ckpt-6.pt", weights_only=True)
    assert ckpt["train"]["world_size"] == 2 and len(ckpt["rng"]) == 2
    for name, v in r0["state"].items():
        assert torch.equal(ckpt["model"][name], v), name
    losses = [r["loss"] for r in r0["history"]]
    assert [r["loss"] for r in r1["history"]] == losses  # all-reduced: every rank logs the global mean
    assert losses[-1] < losses[0]

    import runpy

    mod = runpy.run_path(str(script), run_name="ddp_fit")
    single = mod["make_model"]()
    hist = fit(single, mod["make_data"](), steps=6, batch_size=32, lr=0.05, log_every=1, progress=False)
    assert [r["loss"] for r in hist] == pytest.approx(losses, rel=1e-6)
    for name, v in single.state_dict().items():
        torch.testing.assert_close(r0["state"][name], v, rtol=0, atol=1e-6, msg=name)
