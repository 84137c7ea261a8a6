"""The trainer's options (issue 21) through the Python API: lr schedules and warm-up, weight
decay, gradient accumulation, mixed precision, callbacks, best checkpoint and early stopping,
TensorBoard, sample grids, held-out FD; each resumes exactly. The command line drives the same
features in test_cli_trainer.py."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
from torch import nn

from pygen.models import Flow, GenerativeModel, load
from pygen.models.update import Update, split_micro_batches
from pygen.ops import randn
from pygen.train import fit
from pygen.train.callbacks import BestCheckpoint, Callback, HeldOutFD, SampleGrids, TensorBoard
from pygen.train.schedules import apply_base_lr, apply_weight_decay, base_lrs, lr_factor, lr_schedulers, set_current_lr

pytestmark = pytest.mark.usefixtures("one_thread")


def moons(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * math.pi
    x = torch.stack([t.cos(), t.sin()], 1) + 0.1 * torch.randn(n, 2, generator=g)
    return (x - x.mean(0)) / x.std(0)


def flow(**kw) -> Flow:
    torch.manual_seed(0)
    return Flow("realnvp", (2,), hidden=16, n_layers=2, **kw)


class Linear(GenerativeModel, family="test-linear-regression"):
    """A deterministic loss with batch-mean structure: 0.5 mean_i ||W x_i + b - t_i||^2 (t = x
    rolled), so that gradients of micro-batches can be compared exactly."""

    def __init__(self, dim: int = 3) -> None:
        super().__init__()
        self.config = {"dim": dim}
        torch.manual_seed(1)
        self.lin = nn.Linear(dim, dim)

    def loss(self, batch):
        x = batch[0] if isinstance(batch, tuple) else batch
        err = self.lin(x) - x.roll(1, dims=1)
        per_example = 0.5 * (err**2).sum(1)
        return {"loss": per_example.mean(), "max_err": err.abs().amax()}

    def sample(self, n, *, seed=None, generator=None, offset=0):
        return randn(n, self.config["dim"], seed=seed, generator=generator, offset=offset * self.config["dim"])


# ---- lr schedules, warm-up, weight decay ---------------------------------------------------------


def test_lr_factor_exact_values():
    const = lr_factor("constant", 4, 10)
    assert [const(k) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = lr_factor("cosine", 2, 6)  # decay over steps 2..5: p = 1/5 .. 4/5
    expect = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * p / 5)) for p in (1, 2, 3, 4)]
    assert [cos(k) for k in range(6)] == pytest.approx(expect, rel=1e-12)
    lin = lr_factor("linear", 0, 4)
    assert [lin(k) for k in range(4)] == pytest.approx([0.8, 0.6, 0.4, 0.2], rel=1e-12)
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor("exp", 0, 4)
    with pytest.raises(ValueError, match="warmup"):
        lr_factor("cosine", -1, 4)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_logged_lr_is_the_lr_of_each_step(schedule):
    hist = fit(flow(), moons(64), steps=8, batch_size=16, lr=0.01, lr_schedule=schedule, warmup=3, log_every=1,
               progress=False)  # fmt: skip
    f = lr_factor(schedule, 3, 8)
    assert [r["lr"] for r in hist] == pytest.approx([0.01 * f(k) for k in range(8)], rel=1e-12)


def test_weight_decay_is_adamw_decoupled():
    m = flow()
    fit(m, moons(64), steps=3, batch_size=16, lr=0.01, weight_decay=0.1, log_every=1, progress=False)
    ref = flow()
    opt = torch.optim.AdamW(ref.parameters(), lr=0.01, weight_decay=0.1)
    # the same steps by hand: fit's setup (ActNorm init on batch 0), then AdamW
    from pygen.train.loop import BatchOrder

    x, order = moons(64), BatchOrder(64, 16, 0)
    torch.manual_seed(0)
    ref.setup(x[order.indices(0)])
    for k in range(3):
        opt.zero_grad()
        ref.loss(x[order.indices(k)])["loss"].backward()
        opt.step()
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    sgd = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)
    apply_weight_decay([sgd], 0.5)
    assert sgd.param_groups[0]["weight_decay"] == 0.5
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="weight_decay"):
            apply_weight_decay([sgd], bad)


class Interrupt(Callback):
    def __init__(self, at):
        self.at = at

    def on_step(self, run, record):
        if run.step == self.at:
            raise KeyboardInterrupt


def test_schedule_resumes_exactly_and_another_schedule_is_refused(tmp_path):
    x = moons(64)
    opts = dict(batch_size=16, lr=0.01, lr_schedule="cosine", warmup=2, weight_decay=0.01, grad_accum=2, log_every=1,
                checkpoint_every=3, progress=False)  # fmt: skip
    whole = flow()
    fit(whole, x, steps=7, out=tmp_path / "a", **opts)
    with pytest.raises(KeyboardInterrupt):  # killed after step 4: the last checkpoint is step 3's
        fit(flow(), x, steps=7, out=tmp_path / "b", callbacks=[Interrupt(4)], **opts)
    resumed = flow()
    fit(resumed, x, steps=7, out=tmp_path / "b", resume=True, **opts)
    for (name, p), q in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    la = [json.loads(s)["lr"] for s in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(s)["lr"] for s in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert la == lb and len(la) == 7
    with pytest.warns(UserWarning, match="decays to 0 at step 9.*was 7"):  # longer: the schedule stretches
        fit(flow(), x, steps=9, out=tmp_path / "a", resume=True, **opts)
    with pytest.raises(ValueError, match="lr_schedule='linear'.*'cosine'"):
        fit(flow(), x, steps=9, out=tmp_path / "b", resume=True, **{**opts, "lr_schedule": "linear"})
    with pytest.raises(ValueError, match="warmup=5"):
        fit(flow(), x, steps=9, out=tmp_path / "b", resume=True, **{**opts, "warmup": 5})


# ---- gradient accumulation -------------------------------------------------------------------------


def test_split_micro_batches_weights_and_labels():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    parts = split_micro_batches((x, y), 3)
    assert [w for _, w in parts] == [0.4, 0.3, 0.3]
    assert torch.equal(torch.cat([p[0] for p, _ in parts]), x) and torch.equal(torch.cat([p[1] for p, _ in parts]), y)
    assert split_micro_batches(x, 1) == [(x, 1.0)]
    with pytest.raises(ValueError, match="grad_accum=11"):
        split_micro_batches(x, 11)


@pytest.mark.parametrize("k", [2, 3, 10])
def test_accumulated_gradients_equal_the_whole_batch(k):
    x = torch.randn(10, 3, dtype=torch.float64)
    whole, accum = Linear().double(), Linear().double()
    terms_whole = Update().backward(whole, x)
    terms_accum = Update(grad_accum=k).backward(accum, x)
    for p, q in zip(whole.parameters(), accum.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(terms_accum["loss"], terms_whole["loss"], rtol=1e-12, atol=0)


def test_inner_micro_batches_do_not_sync():
    entered = []

    @contextlib.contextmanager
    def no_sync():
        entered.append(len(calls))
        yield

    calls = []
    m = Linear()

    def forward(batch):
        calls.append(batch.shape[0])
        return m(batch)

    Update(forward, grad_accum=3, no_sync=no_sync).backward(m, torch.randn(7, 3))
    assert calls == [3, 2, 2] and entered == [0, 1]  # micro-batches 0 and 1 inside no_sync, the last outside


def test_fit_with_grad_accum_matches_the_whole_batch():
    a, b = Linear(), Linear()
    x = torch.randn(64, 3)
    ha = fit(a, x, steps=5, batch_size=32, log_every=1, progress=False)
    hb = fit(b, x, steps=5, batch_size=32, grad_accum=4, log_every=1, progress=False)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    assert [r["loss"] for r in hb] == pytest.approx([r["loss"] for r in ha], rel=1e-5)
    with pytest.raises(ValueError, match="grad_accum=64 needs at least"):
        fit(Linear(), x, steps=1, batch_size=32, grad_accum=64, progress=False)


def test_gan_steps_accumulate_too():
    from pygen.models import GAN

    torch.manual_seed(0)
    gan = GAN((2,), z_dim=4, g_hidden=16, d_hidden=16)
    opts = gan.configure_optimizers()
    out = gan.training_step(moons(16), 0, opts, update=Update(grad_accum=4))
    assert torch.isfinite(out["loss"]) and opts[0].state and opts[1].state


# ---- precision ----------------------------------------------------------------------------------------


def test_fp16_on_cpu_and_bf16_without_native_support_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        fit(Linear(), torch.randn(8, 3), steps=1, batch_size=8, precision="fp16", progress=False)
    with pytest.raises(ValueError, match="precision must be one of"):
        fit(Linear(), torch.randn(8, 3), steps=1, batch_size=8, precision="fp8", progress=False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True})
    with pytest.raises(ValueError, match="native bfloat16"):
        fit(Linear(), torch.randn(8, 3), steps=1, batch_size=8, precision="bf16", progress=False)


@pytest.mark.skipif(not torch.cpu.get_capabilities().get("avx512_bf16") and not torch.cpu.get_capabilities().get("amx_bf16"),
                    reason="this CPU has no native bfloat16")  # fmt: skip
def test_bf16_autocast_runs_the_forward_in_bf16():
    m = Linear()
    seen = []
    m.lin.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    hist = fit(m, torch.randn(64, 3), steps=20, batch_size=16, precision="bf16", log_every=20, progress=False)
    ref = Linear()
    href = fit(ref, torch.randn(64, 3), steps=20, batch_size=16, log_every=20, progress=False)
    assert set(seen) == {torch.bfloat16} and m.lin.weight.dtype == torch.float32
    assert hist[-1]["loss"] == pytest.approx(href[-1]["loss"], rel=0.05)  # bf16 has ~3 significant digits


# ---- callbacks ----------------------------------------------------------------------------------------


class Recorder(Callback):
    def __init__(self):
        self.events, self.count = [], 0

    def on_start(self, run):
        self.events.append(("start", run.step))

    def on_eval(self, run, metrics):
        self.events.append(("eval", run.step, sorted(metrics)))
        metrics["eval/extra"] = 1.0

    def on_step(self, run, record):
        self.count += 1
        self.events.append(("step", run.step, "eval/extra" in record))

    def on_end(self, run):
        self.events.append(("end", run.step))

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def test_callback_hooks_order_records_and_state_resume(tmp_path):
    x = moons(64)
    cb = Recorder()
    hist = fit(flow(), x, steps=4, batch_size=16, eval_data=x, eval_every=2, log_every=2, out=tmp_path,
               checkpoint_every=2, callbacks=[cb], progress=False)  # fmt: skip
    assert cb.events == [("start", 0), ("step", 1, False), ("eval", 2, ["eval/loss"]), ("step", 2, True),
                         ("step", 3, False), ("eval", 4, ["eval/loss"]), ("step", 4, True), ("end", 4)]  # fmt: skip
    assert hist[0]["eval/extra"] == 1.0  # what a callback adds is logged
    again = Recorder()
    fit(flow(), x, steps=6, batch_size=16, out=tmp_path, resume=True, callbacks=[again], progress=False)
    assert again.count == 4 + 2 and again.events[0] == ("start", 4)  # its state came from the checkpoint
    with pytest.raises(TypeError, match="Callback"):
        fit(flow(), x, steps=1, batch_size=16, callbacks=[lambda run: None], progress=False)


class Scripted(Callback):
    """Logs a scripted metric value at each step (step k gets values[k - 1])."""

    def __init__(self, values):
        self.values = values

    def on_step(self, run, record):
        record["score"] = self.values[run.step - 1]


def test_best_checkpoint_and_early_stop(tmp_path):
    x = moons(64)
    m = flow(ema_decay=0.5)
    best = BestCheckpoint("score", patience=2)
    hist = fit(m, x, steps=10, batch_size=16, out=tmp_path, checkpoint_every=100, log_every=1,
               callbacks=[Scripted([5, 3, 4, 3, 9, 1, 0, 0, 0, 0]), best], progress=False)  # fmt: skip
    # best at step 2 (3 < 5); 4 and 3 (not < 3) do not improve: patience 2 stops at step 4
    assert [r["step"] for r in hist] == [1, 2, 3, 4] and hist[-1]["stopped_early"] == 1.0
    saved = torch.load(tmp_path / "best.pt", weights_only=True)
    assert saved["best"] == {"metric": "score", "value": 3, "step": 2} and saved["step"] == 2
    assert (tmp_path / "latest").read_text().strip() == "ckpt-4.pt"  # the stop wrote a checkpoint
    assert torch.load(tmp_path / "ckpt-4.pt", weights_only=True)["stopped"].startswith("score has not improved")
    # the model ends with the best checkpoint's EMA weights: what load(run) gives by default
    for name, v in load(tmp_path).state_dict().items():
        assert torch.equal(v, m.state_dict()[name]) and torch.equal(v, saved["ema"][name]), name
    latest = load(tmp_path, checkpoint="latest")
    assert not all(torch.equal(v, saved["ema"][k]) for k, v in latest.state_dict().items())
    assert load(tmp_path, checkpoint=4).state_dict().keys() == latest.state_dict().keys()
    with pytest.raises(FileNotFoundError, match="kept steps: 4"):
        load(tmp_path, checkpoint=3)
    with pytest.raises(ValueError, match="'best', 'latest' or a step"):
        load(tmp_path, checkpoint="newest")
    # a stopped run stays stopped
    with pytest.warns(UserWarning, match="stopped early at step 4"):
        assert fit(flow(ema_decay=0.5), x, steps=10, batch_size=16, out=tmp_path, resume=True,
                   callbacks=[BestCheckpoint("score", patience=2)], progress=False) == []  # fmt: skip


def test_best_checkpoint_maximises_with_max_prefix(tmp_path):
    best = BestCheckpoint("max:score")
    fit(flow(), moons(64), steps=4, batch_size=16, out=tmp_path, callbacks=[Scripted([1, 5, 2, 4]), best],
        progress=False)  # fmt: skip
    assert torch.load(tmp_path / "best.pt", weights_only=True)["best"] == {"metric": "score", "value": 5, "step": 2}
    with pytest.raises(ValueError, match="patience"):
        BestCheckpoint("score", patience=0)


def test_held_out_loss_picks_the_best_checkpoint(tmp_path):
    x = moons(256)
    best = BestCheckpoint("eval/loss")
    hist = fit(flow(), x[:192], steps=12, batch_size=32, out=tmp_path, eval_data=x[192:], eval_every=3,
               log_every=3, callbacks=[best], progress=False)  # fmt: skip
    losses = {r["step"]: r["eval/loss"] for r in hist}
    step = min(losses, key=losses.get)
    assert torch.load(tmp_path / "best.pt", weights_only=True)["best"]["step"] == step


def test_tensorboard_and_sample_grids(tmp_path):
    pytest.importorskip("tensorboard")
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import pygen.data
    from pygen.models import VAE

    data = pygen.data.load("digits")
    torch.manual_seed(0)
    vae = VAE.for_data(data, hidden=32, latent_dim=4)
    tb = TensorBoard()
    grids = SampleGrids(3, n=16, tensorboard=tb)
    fit(vae, data.data[:256], steps=6, batch_size=32, out=tmp_path, log_every=2, callbacks=[grids, tb], progress=False)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step-0000003.png", "step-0000006.png"]
    img = Image.open(tmp_path / "samples" / "step-0000006.png")
    assert img.mode == "L" and img.size[0] > 4 * 8 * 4  # 4x4 cells of 8 px, scaled up
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert [e.step for e in acc.Scalars("loss")] == [2, 4, 6]
    assert [e.step for e in acc.Images("samples")] == [3, 6]


def test_held_out_fd_is_logged_and_can_choose_the_best(tmp_path):
    import pygen.data
    from pygen.models import VAE

    data = pygen.data.load("digits")
    train, test = pygen.data.train_test(data)
    torch.manual_seed(0)
    vae = VAE.for_data(train, hidden=32, latent_dim=4)
    fd = HeldOutFD(test, 4, n=100)
    hist = fit(vae, train.data, steps=8, batch_size=32, out=tmp_path, log_every=4,
               callbacks=[fd, BestCheckpoint("eval/fd")], progress=False)  # fmt: skip
    fds = [r["eval/fd"] for r in hist]
    assert len(fds) == 2 and all(v > 0 and math.isfinite(v) for v in fds)
    assert torch.load(tmp_path / "best.pt", weights_only=True)["best"]["value"] == min(fds)


# ---- the schedule helpers, exactly (mutation testing found these unpinned) -----------------------


def _adam(*lrs: float) -> torch.optim.Adam:
    return torch.optim.Adam([{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs])


def test_schedule_helpers_refuse_and_accept_exactly():
    with pytest.raises(ValueError, match="warmup must be an int >= 0, got 1.5"):
        lr_factor("cosine", 1.5, 10)
    opt = _adam(0.1)
    apply_weight_decay([opt], 0)  # zero is a valid decay (it switches decay off)
    assert opt.param_groups[0]["weight_decay"] == 0.0 and opt.param_groups[0]["decoupled_weight_decay"]
    lbfgs = torch.optim.LBFGS([nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match="^LBFGS has no weight_decay setting$"):
        apply_weight_decay([lbfgs], 0.1)


def test_base_lrs_set_current_lr_and_apply_base_lr_exactly():
    opt = _adam(0.1, 0.03)  # two groups
    (sch,) = lr_schedulers([opt], "cosine", 4, 10)
    assert [g["lr"] for g in opt.param_groups] == [0.1 / 4, 0.03 / 4]  # warm-up step 0
    assert base_lrs([opt]) == [[0.1, 0.03]]  # the base, not the scheduled value
    for _ in range(5):
        opt.step()
        sch.step()
    f = lr_factor("cosine", 4, 10)(5)
    for g in opt.param_groups:
        g["lr"] = -1.0  # what a checkpoint of another schedule might have left
    set_current_lr([sch])
    assert [g["lr"] for g in opt.param_groups] == [0.1 * f, 0.03 * f] == sch.get_last_lr()
    apply_base_lr([opt], [sch], [[0.01, 0.003]])
    assert [(g["lr"], g["initial_lr"]) for g in opt.param_groups] == [(0.01, 0.01), (0.003, 0.003)]
    assert sch.base_lrs == [0.01, 0.003] and base_lrs([opt]) == [[0.01, 0.003]]
    set_current_lr([sch])
    assert [g["lr"] for g in opt.param_groups] == [0.01 * f, 0.003 * f]
    plain = _adam(0.2)  # no scheduler: the group's lr is its base
    apply_base_lr([plain], [], [[0.05]])
    assert plain.param_groups[0]["lr"] == 0.05 and "initial_lr" not in plain.param_groups[0]


def test_held_out_fd_is_the_fd_of_its_seeded_subset_against_as_many_samples():
    """Exact answers for HeldOutFD (its mutants survived a test that only saw a finite FD):
    the held-out subset is randperm(seed)[:n], the samples are sample(n, seed), the FD is
    frechet_distance of their features, logged at multiples of ``every`` and at the last step."""
    from types import SimpleNamespace

    import pygen.data
    from pygen.metrics.sample_quality import frechet_distance

    data = pygen.data.load("two_moons")
    x = data.data
    torch.manual_seed(0)
    model = Flow("realnvp", (2,), hidden=8, n_layers=2)
    fd = HeldOutFD(data, 3, n=20, seed=5)
    assert (fd.n, fd.name, fd.every, fd.seed) == (20, "points", 3, 5)
    real = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(5))[:20]]
    assert torch.equal(fd.real, real)
    rec: dict = {}
    fd.on_step(SimpleNamespace(step=3, steps=10, sampling_model=model), rec)
    assert rec["eval/fd"] == pytest.approx(frechet_distance(real, model.sample(20, seed=5)), rel=1e-6)
    assert HeldOutFD(data, 3, n=20, seed=6).real.tolist() != real.tolist()  # the seed picks the subset
    for step, logged in ((4, False), (6, True), (10, True)):  # multiples of every, and the last step
        rec = {}
        fd.on_step(SimpleNamespace(step=step, steps=10, sampling_model=model), rec)
        assert ("eval/fd" in rec) is logged, step
    assert HeldOutFD(data, 3, n=len(x) + 5).n == len(x)  # at most the held-out examples there are
    for every in (0, True, 1.5):
        with pytest.raises(ValueError, match=f"eval_fd_every must be an int >= 1, got {every!r}"):
            HeldOutFD(data, every)
