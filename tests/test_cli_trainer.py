"""The trainer's options driven as a user would (subprocesses of ``python -m pygen`` and
torchrun): schedule in the log, gradient accumulation equal to the whole batch (one process
and two DDP ranks), best.pt chosen and used by sample/eval, sample grids and TensorBoard
files, a user's own denoiser trained, saved, loaded and sampled, and each mistake one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pygen.train.schedules import lr_factor

REPO = Path(__file__).resolve().parents[1]
TINY_VAE = ["--hidden", "32", "--latent-dim", "4"]


def env(**extra: str) -> dict[str, str]:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}
    e["PYTHONPATH"] = os.pathsep.join(p for p in (extra.get("PYTHONPATH"), str(REPO)) if p)
    e.pop("TRITON_INTERPRET", None)
    return e


def cli(*args, check=True, timeout=300, **extra_env) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pygen", *map(str, args)], cwd=REPO, env=env(**extra_env),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_user_error(proc, *needles):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def monitored(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trainer") / "vae"
    cli("train", "vae", "--data", "digits", "--out", run, "--steps", "20", "--batch-size", "32", "--lr", "0.002",
        "--lr-schedule", "cosine", "--warmup", "5", "--grad-accum", "2", "--weight-decay", "0.01",
        "--grad-clip", "1e9", "--keep-best", "--early-stop", "50", "--sample-every", "10", "--tensorboard", "--eval-every", "5",
        "--log-every", "1", "--checkpoint-every", "10", "--no-progress", *TINY_VAE)  # fmt: skip
    return run


def test_schedule_settings_best_grids_and_tensorboard(monitored):
    pytest.importorskip("tensorboard")
    f = lr_factor("cosine", 5, 20)
    assert [r["lr"] for r in records(monitored)] == pytest.approx([0.002 * f(k) for k in range(20)], rel=1e-9)
    saved = json.loads((monitored / "train.json").read_text())
    assert {k: saved[k] for k in ("lr_schedule", "warmup", "grad_accum", "weight_decay", "grad_clip", "keep_best",
                                  "early_stop", "sample_every", "tensorboard")} == {  # fmt: skip
        "lr_schedule": "cosine", "warmup": 5, "grad_accum": 2, "weight_decay": 0.01, "grad_clip": 1e9,
        "keep_best": "auto", "early_stop": 50, "sample_every": 10, "tensorboard": True}  # fmt: skip
    assert all(r["grad_norm"] > 0 for r in records(monitored) if "loss" in r)  # clipping logs the norm
    evals = {r["step"]: r["eval/loss"] for r in records(monitored) if "eval/loss" in r}
    best = torch.load(monitored / "best.pt", weights_only=True)["best"]
    assert best["metric"] == "eval/loss" and best["step"] == min(evals, key=evals.get)
    assert sorted(p.name for p in (monitored / "samples").iterdir()) == ["step-0000010.png", "step-0000020.png"]
    assert list((monitored / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_keeps_the_settings_and_stretches_the_schedule(monitored, tmp_path):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(monitored, run)
    proc = cli("train", "vae", "--out", run, "--resume", "--steps", "24", "--no-progress")
    assert "decays to 0 at step 24 (was 20)" in proc.stderr
    recs = records(run)
    assert [r["step"] for r in recs] == list(range(1, 25))
    assert recs[20]["lr"] == pytest.approx(0.002 * lr_factor("cosine", 5, 24)(20), rel=1e-9)
    assert sorted(p.name for p in (run / "samples").iterdir())[-1] == "step-0000024.png"
    refused = cli("train", "vae", "--out", run, "--resume", "--steps", "30", "--lr-schedule", "linear", check=False)
    assert_user_error(refused, "lr_schedule='linear'", "'cosine'")


def test_sample_and_eval_say_which_checkpoint_and_pick_it(monitored, tmp_path):
    best = cli("sample", monitored, "-n", "8", "--out", tmp_path / "a", "--no-progress")
    assert f"from {(monitored / 'best.pt').resolve()}" in best.stdout
    latest = cli("sample", monitored, "-n", "8", "--out", tmp_path / "b", "--no-progress", "--checkpoint", "latest")
    assert f"from {(monitored / 'ckpt-20.pt').resolve()}" in latest.stdout
    step = cli("sample", monitored, "-n", "8", "--out", tmp_path / "c", "--no-progress", "--checkpoint", "10")
    assert "ckpt-10.pt" in step.stdout
    assert_user_error(cli("sample", monitored, "-n", "8", "--out", tmp_path / "d", "--checkpoint", "7", check=False),
                      "no checkpoint of step 7", "kept steps: 10, 20")  # fmt: skip
    ev = cli("eval", monitored, "--data", "digits", "--n", "50", "--checkpoint", "latest")
    assert "evaluating" in ev.stdout and "ckpt-20.pt" in ev.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--grad-accum", "0"], "--grad-accum: must be >= 1"),
        (["--warmup", "-1"], "--warmup: must be >= 0"),
        (["--weight-decay", "-0.1"], "--weight-decay: must be a finite number >= 0"),
        (["--weight-decay", "nan"], "--weight-decay: must be a finite number >= 0"),
        (["--grad-clip", "0"], "--grad-clip: must be a finite number > 0, got 0"),
        (["--early-stop", "0"], "--early-stop: must be >= 1"),
        (["--sample-every", "x"], "--sample-every: expected an integer"),
        (["--precision", "fp16"], "fp16"),
        (["--lr-schedule", "step"], "invalid choice"),
        (["--grad-accum", "64", "--batch-size", "32"], "grad_accum=64 needs at least"),
    ],
)
def test_trainer_mistakes_are_one_line(args, needle, tmp_path):
    proc = cli("train", "vae", "--data", "digits", "--out", tmp_path / "r", "--steps", "2", *args, "--no-progress",
               *TINY_VAE, check=False)  # fmt: skip
    assert_user_error(proc, needle)


def test_tensorboard_missing_is_one_line(tmp_path):
    fake = tmp_path / "site"
    (fake / "tensorboard").mkdir(parents=True)
    (fake / "tensorboard" / "__init__.py").write_text("raise ImportError('No module named tensorboard')\n")
    proc = cli("train", "vae", "--data", "digits", "--out", tmp_path / "r", "--steps", "2", "--tensorboard",
               "--no-progress", *TINY_VAE, check=False, PYTHONPATH=str(fake))  # fmt: skip
    assert_user_error(proc, "--tensorboard", "pip install tensorboard")


def test_grad_accum_equals_the_whole_batch_through_the_cli(tmp_path):
    """The user-level claim, loosely: Adam turns rounding noise in the near-zero gradients of the
    data-initialised ActNorm into +-lr steps, so weights agree to a few lr, not to rounding (the
    exact equality of accumulated gradients is in test_trainer_features.py; with SGD under DDP below)."""
    for k in (1, 4):
        cli("train", "flow", "--data", "two_moons", "--out", tmp_path / f"k{k}", "--steps", "5", "--batch-size", "64",
            "--grad-accum", k, "--hidden", "16", "--option", "n_layers=2", "--log-every", "1", "--no-progress")  # fmt: skip
    a = torch.load(tmp_path / "k1" / "ckpt-5.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "k4" / "ckpt-5.pt", weights_only=True)["model"]
    for name, v in a.items():
        torch.testing.assert_close(b[name], v, rtol=0, atol=5e-3, msg=name)  # lr 1e-3, 5 steps
    la, lb = ([r["loss"] for r in records(tmp_path / d)] for d in ("k1", "k4"))
    assert lb == pytest.approx(la, rel=1e-3)


USER_NET = '''
import torch
from torch import nn


class TinyDenoiser(nn.Module):
    """The user's denoiser: the noise level as an extra input channel, a label embedding."""

    def __init__(self, shape, num_classes=None, width=16):
        super().__init__()
        c = shape[0]
        self.label = nn.Embedding(num_classes + 1, 1) if num_classes else None
        self.body = nn.Sequential(nn.Conv2d(c + 1, width, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(width, c, 3, padding=1))

    def forward(self, x, c_noise, labels=None, cond=None, aug_level=None):
        level = c_noise.float()[:, None, None, None].expand(-1, 1, *x.shape[2:])
        if self.label is not None and labels is not None:
            level = level + self.label(labels)[:, :, None, None]
        return self.body(torch.cat([x, level.to(x.dtype)], 1))
'''


def test_a_user_denoiser_trains_saves_loads_and_samples(tmp_path):
    (tmp_path / "mynets.py").write_text(USER_NET)
    run, path = tmp_path / "run", str(tmp_path)
    spec = '{"target": "mynets:TinyDenoiser", "kwargs": {"width": 8}}'
    proc = cli("train", "diffusion", "--data", "digits", "--out", run, "--steps", "6", "--batch-size", "16",
               "--option", f"net={spec}", "--no-progress", PYTHONPATH=path)  # fmt: skip
    assert "training diffusion (" in proc.stdout
    config = torch.load(run / (run / "latest").read_text().strip(), weights_only=True)["config"]
    assert config["net"] == {"target": "mynets:TinyDenoiser", "kwargs": {"width": 8}}
    cli("sample", run, "-n", "8", "--out", tmp_path / "s", "--steps", "4", "--no-progress", PYTHONPATH=path)
    with __import__("numpy").load(next((tmp_path / "s").glob("*.npz"))) as f:
        x = f["samples"]
    assert x.shape == (8, 1, 8, 8) and (x >= 0).all() and (x <= 1).all()
    # elsewhere, without the module: one line naming it
    assert_user_error(cli("sample", run, "-n", "8", "--out", tmp_path / "t", check=False), "cannot import 'mynets'")
    # a spec that is not a module class is refused before anything is called
    bad = cli("train", "diffusion", "--data", "digits", "--out", tmp_path / "bad", "--steps", "1",
              "--option", "net=os:system", "--no-progress", check=False)  # fmt: skip
    assert_user_error(bad, "'os:system' is not an nn.Module class")


DDP_ACCUM = textwrap.dedent('''
    import os, sys, torch
    import torch.distributed as dist
    from pygen.models import Flow
    from pygen.train import ddp, fit

    calls = [0]
    wrap = ddp.wrap

    def counting_wrap(model, info):  # count DDP's gradient all-reduces (one call per bucket)
        m = wrap(model, info)

        def hook(state, bucket):
            calls[0] += 1
            fut = dist.all_reduce(bucket.buffer().div_(dist.get_world_size()), async_op=True).get_future()
            return fut.then(lambda f: f.value()[0])

        m.register_comm_hook(None, hook)
        return m

    class SGDFlow(Flow, family="test-sgd-flow-accum"):
        def configure_optimizers(self, lr=None):
            return [torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9)]

    def make_data():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(96, 2, generator=g)
        return torch.stack([x[:, 0], 0.5 * x[:, 0] ** 2 + 0.3 * x[:, 1]], 1)

    def make_model():
        torch.manual_seed(0)
        return SGDFlow("realnvp", (2,), hidden=16, n_layers=2)

    if __name__ == "__main__":
        k, dump = int(sys.argv[1]), sys.argv[2]
        ddp.wrap = counting_wrap
        model = make_model()
        fit(model, make_data(), steps=6, batch_size=32, lr=0.05, grad_accum=k, progress=False)
        torch.save({"state": model.state_dict(), "calls": calls[0]}, os.path.join(dump, f"k{k}-rank{os.environ['RANK']}.pt"))
''')


def test_grad_accum_under_torchrun_syncs_once_per_step(tmp_path):
    script = tmp_path / "ddp_accum.py"
    script.write_text(DDP_ACCUM)
    for k in (1, 4):  # 2 ranks x 16 examples, in 4 micro-batches of 4
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", str(script),
               str(k), str(tmp_path)]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, accum = (torch.load(tmp_path / f"k{k}-rank0.pt", weights_only=True) for k in (1, 4))
    assert accum["calls"] == one["calls"] and one["calls"] % 6 == 0 and one["calls"] > 0  # no inner all-reduce
    for name, v in one["state"].items():
        torch.testing.assert_close(accum["state"][name], v, rtol=0, atol=1e-6, msg=name)

    import runpy

    mod = runpy.run_path(str(script), run_name="ddp_accum")
    single = mod["make_model"]()
    from pygen.train import fit

    fit(single, mod["make_data"](), steps=6, batch_size=32, lr=0.05, progress=False)
    for name, v in single.state_dict().items():
        torch.testing.assert_close(accum["state"][name], v, rtol=0, atol=1e-6, msg=name)


def test_compile_flag_trains_the_compiled_loss(tmp_path):
    """`pygen train --compile` runs fit(compile=True): the same run as eager up to float
    rounding (inductor reorders the arithmetic)."""
    args = ["train", "vae", "--data", "digits", "--steps", "3", "--batch-size", "16", "--no-progress", *TINY_VAE]
    cli(*args, "--out", tmp_path / "eager")
    cli(*args, "--out", tmp_path / "compiled", "--compile", timeout=600)
    eager, compiled = records(tmp_path / "eager"), records(tmp_path / "compiled")
    assert [r["step"] for r in compiled] == [r["step"] for r in eager]
    assert compiled[-1]["loss"] == pytest.approx(eager[-1]["loss"], rel=1e-3)
