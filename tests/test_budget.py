"""``pygen train --minutes M`` (issue 18, item 4): the step count comes from a throughput probe
on a copy of the model that leaves the real run untouched, is written to train.json, and a
resume continues to it exactly."""

from __future__ import annotations

import json
import signal
import time
import warnings

import pytest
import torch

from pygen.cli import main as cli_main
from pygen.models import VAE, LatentDiffusion
from pygen.train import fit
from pygen.train.budget import OVERHEAD, measure_step_seconds, steps_for_minutes

from test_cli import TINY, assert_user_error, cli

pytestmark = pytest.mark.usefixtures("one_thread")


def test_steps_for_minutes_arithmetic():
    assert steps_for_minutes(10, 0.5) == int(600 * (1 - OVERHEAD) / 0.5)
    assert steps_for_minutes(1, 0.5, spent=30) == int(30 * (1 - OVERHEAD) / 0.5)
    assert steps_for_minutes(0.001, 100.0) == 1  # at least one step
    with pytest.raises(ValueError, match="minutes must be > 0"):
        steps_for_minutes(0, 1.0)


def test_probe_leaves_model_and_rng_untouched():
    x = torch.rand(64, 1, 8, 8)

    def run(probe: bool) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        model = VAE((1, 8, 8), latent_dim=2, hidden=16, network="mlp")
        if probe:
            sec = measure_step_seconds(model, x, batch_size=16, min_steps=2, min_seconds=0.0)
            assert 0 < sec < 60
        after_init = torch.rand(3)  # the RNG stream after the model's initialisation
        fit(model, x, steps=3, batch_size=16, progress=False)
        return after_init, torch.cat([p.detach().flatten() for p in model.parameters()])

    (r0, w0), (r1, w1) = run(False), run(True)
    assert torch.equal(r0, r1) and torch.equal(w0, w1)


def test_cli_minutes_sets_and_records_the_step_count(tmp_path):
    run = tmp_path / "vae"
    out = cli("train", "vae", "--data", "digits", "--out", run, "--minutes", "0.05", "--batch-size", "32",
              "--no-progress", *TINY["vae"])
    rec = json.loads((run / "train.json").read_text())
    assert rec["minutes"] == 0.05 and rec["measured_seconds_per_step"] > 0
    assert 1 <= rec["steps"] <= steps_for_minutes(0.05, rec["measured_seconds_per_step"])  # the probe's time is spent
    assert f"{rec['steps']} steps in 0.05 minutes" in out.stdout
    assert (run / "latest").read_text().strip() == f"ckpt-{rec['steps']}.pt"
    again = cli("train", "vae", "--out", run, "--resume", "--no-progress")  # the same count: nothing left to do
    after = json.loads((run / "train.json").read_text())
    assert {**after, "command": None} == {**rec, "command": None}  # how the count was set is kept too
    assert (run / "latest").read_text().strip() == f"ckpt-{rec['steps']}.pt", again.stdout
    assert_user_error(cli("train", "vae", "--out", run, "--resume", "--minutes", "1", "--no-progress", check=False),
                      "--minutes sets the step count of a new run")
    assert_user_error(cli("train", "vae", "--data", "digits", "--out", tmp_path / "b", "--minutes", "1", "--steps",
                          "5", "--no-progress", check=False), "give --steps or --minutes, not both")
    assert_user_error(cli("train", "vae", "--data", "digits", "--out", tmp_path / "c", "--minutes", "0",
                          "--no-progress", check=False), "--minutes")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"steps": 7}))  # a config's step count conflicts as --steps does
    assert_user_error(cli("train", "vae", "--data", "digits", "--out", tmp_path / "d", "--minutes", "1", "--config",
                          cfg, "--no-progress", check=False), f"--minutes sets the step count: {cfg} gives steps too")
    assert not (tmp_path / "d" / "train.json").exists()


def test_a_cheaper_first_stage_keeps_its_steps_and_the_rest_of_the_time_goes_to_the_dearer_stage():
    budget = 600 * (1 - OVERHEAD)  # 10 minutes: 480 s
    # 100 first-stage steps of 0.1 s (10 s), then 470 s of 1 s steps
    assert steps_for_minutes(10, 1.0, first_stage=(100, 0.1)) == 100 + int((budget - 10) / 1.0)
    # 1000 first-stage steps would take 100 s but then outnumber the 380 that follow:
    # the first stage is cut to n = 480 / 1.1 = 436 steps, the dearer one gets >= n
    n = int(budget / 1.1)
    assert n == 436
    steps = steps_for_minutes(10, 1.0, first_stage=(1000, 0.1))
    assert steps == n + int(budget - n * 0.1)
    assert LatentDiffusion((1, 8, 8), ae_steps=1000).stage_steps_for(steps) == n  # the split the budget assumed
    assert steps_for_minutes(10, 1.0, first_stage=(0, 0.1)) == steps_for_minutes(10, 1.0)


def test_the_minutes_plan_times_each_stage_of_a_staged_model_at_its_own_cost(monkeypatch):
    import pygen.train.budget as budget

    timed = []

    def fake(model, data, *, batch_size, probe=None, **kw):
        timed.append(None if probe is None else (int(probe.ae_steps), model.ae_steps))
        return 1.0 if probe is None else 0.25

    monkeypatch.setattr(budget, "measure_step_seconds", fake)
    model = LatentDiffusion((1, 8, 8), ae_steps=30)  # fits: 30 x (0.25 + 1) s <= the 48 s planned
    steps, sec, first = budget.plan_for_minutes(model, torch.rand(8, 1, 8, 8), 1.0, batch_size=4)
    assert timed == [None, (2**62, 30)] and (sec, first) == (1.0, 0.25)  # its autoencoder-only copy timed apart
    assert 30 + int(60 * (1 - OVERHEAD) - 30 * 0.25) - 1 <= steps <= 30 + int(60 * (1 - OVERHEAD) - 30 * 0.25)
    timed.clear()
    steps, sec, first = budget.plan_for_minutes(VAE((1, 8, 8), latent_dim=2, hidden=16, network="mlp"),
                                                torch.rand(8, 1, 8, 8), 1.0, batch_size=4)
    assert timed == [None] and first is None and steps <= int(60 * (1 - OVERHEAD))


def test_time_spent_before_the_plan_comes_out_of_the_budget(tmp_path, monkeypatch):
    """plan_for_minutes(spent=s): s seconds already used (the command's data loading and model
    building) are not planned again; the CLI passes the time since it started."""
    import pygen.train.budget as budget

    monkeypatch.setattr(budget, "measure_step_seconds", lambda *a, **k: 1.0)
    model, x = VAE((1, 8, 8), latent_dim=2, hidden=16, network="mlp"), torch.rand(8, 1, 8, 8)
    full = budget.plan_for_minutes(model, x, 1.0, batch_size=4)[0]
    half = budget.plan_for_minutes(model, x, 1.0, batch_size=4, spent=30.0)[0]
    assert int(60 * (1 - OVERHEAD)) - 1 <= full <= int(60 * (1 - OVERHEAD))  # less the (instant) probe's time
    assert int(30 * (1 - OVERHEAD)) - 1 <= half <= int(30 * (1 - OVERHEAD))
    seen = []

    def plan(model, data, minutes, *, spent, **k):
        seen.append(spent)
        return 2, 1.0, None

    monkeypatch.setattr(budget, "plan_for_minutes", plan)
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() sets both: restore them
    handler = signal.getsignal(signal.SIGTERM)
    try:
        t0 = time.perf_counter()
        assert cli_main(["train", "vae", "--data", "digits", "--out", str(tmp_path / "run"), "--minutes", "1",
                         "--no-progress", *TINY["vae"]]) == 0
        elapsed = time.perf_counter() - t0
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert len(seen) == 1 and 0 < seen[0] < elapsed  # loading the digits and building the model took some


def test_cli_minutes_times_latent_diffusions_autoencoder_stage_apart_and_keeps_it_on_resume(tmp_path):
    run = tmp_path / "ld"
    tiny = ["--option", "width=8", "--option", "mults=[1]", "--option", "blocks=1", "--option", "attention=false",
            "--option", "ae_width=4"]
    out = cli("train", "latent-diffusion", "--data", "digits", "--out", run, "--minutes", "0.3", "--batch-size", "16",
              "--no-progress", *tiny)
    rec = json.loads((run / "train.json").read_text())
    first, sec = rec["measured_seconds_per_first_stage_step"], rec["measured_seconds_per_step"]
    assert first > 0 and sec > 0 and f"{first:.3g} s per step of its first stage" in out.stdout
    n = min(2500, rec["steps"] // 2)  # the autoencoder's share, as the budget planned it (0 on a machine so
    assert rec["options"].get("ae_steps", 2500) == n  # loaded that the probes spent the budget: 1 step)
    assert rec["steps"] <= n + (0.3 * 60 * (1 - OVERHEAD) - n * first) / sec + 1  # each stage at its own cost
    cli("train", "latent-diffusion", "--out", run, "--resume", "--no-progress")  # nothing left to do
    assert json.loads((run / "train.json").read_text())["measured_seconds_per_first_stage_step"] == first


def test_stage_options_size_a_staged_model_for_the_run():
    from pygen.models import LatentDiffusion
    from pygen.train.budget import stage_options

    model = LatentDiffusion((1, 8, 8), ae_steps=800)
    assert stage_options(model, 300) == {"ae_steps": 150}  # half of a short run
    assert stage_options(model, 1599) == {"ae_steps": 799}
    assert stage_options(model, 1600) == {}  # 800 fits
    assert stage_options(model, 4000) == {}
    assert stage_options(VAE((1, 8, 8), latent_dim=2, hidden=16, network="mlp"), 5) == {}  # no stages


def test_default_step_count_is_capped_at_the_familys_minutes(tmp_path, monkeypatch, capsys):
    """No --steps: the default count, cut to what fits in ``train_minutes`` here; a machine
    made slow (50 s a step, measured) trains 19 steps (20 min less 20%: 19.2), and says so."""
    import signal
    import warnings

    import pygen.train.budget as budget
    from pygen.cli import main
    from pygen.models import GenerativeModel

    assert GenerativeModel.train_minutes == 20.0
    monkeypatch.setattr(budget, "measure_step_seconds", lambda *a, **k: 50.0)
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() sets both: restore them
    handler = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "run"
    try:
        assert main(["train", "vae", "--data", "digits", "--out", str(out), "--no-progress", *TINY["vae"]]) == 0
        assert main(["train", "vae", "--out", str(out), "--resume", "--no-progress"]) == 0  # no new probe: done
    finally:
        signal.signal(signal.SIGTERM, handler)
    printed = capsys.readouterr().out
    assert "19 steps fit in 20 minutes; training 19 of the default 2000" in printed
    rec = json.loads((out / "train.json").read_text())
    assert rec["steps"] == 19 and rec["default_minutes_cap"] == 20.0 and rec["measured_seconds_per_step"] == 50.0
    assert (out / "latest").read_text().strip() == "ckpt-19.pt"
    monkeypatch.setattr(budget, "measure_step_seconds", lambda *a, **k: 0.001)  # fast: the default count stands
    import argparse

    import pygen.data
    from pygen.cli import _budget_steps

    args = argparse.Namespace(steps=None, resume=False, out=str(tmp_path / "fast"), minutes=None, device=None,
                              started=time.perf_counter())
    settings = {"steps": 2000, "batch_size": 8, "lr": None, "grad_accum": 1, "precision": "fp32"}
    record: dict = {}
    _budget_steps(args, None, pygen.data.load("digits"), settings, record, cap=20.0)
    assert settings["steps"] == record["steps"] == 2000 and record["default_minutes_cap"] == 20.0


def test_images_of_28x28_and_up_ask_for_more_steps_than_fit_in_the_cap_on_a_two_core_cpu():
    """The large-data defaults (measured on Fashion-MNIST): the whole 20 minutes helped every
    family measured, so their step counts exceed what a 2-core CPU fits and the cap binds;
    the digits (64 values an example) keep the counts tuned on them."""
    from types import SimpleNamespace

    from pygen.models import families

    small, edge, large = (SimpleNamespace(shape=s) for s in ((1, 8, 8), (1, 15, 17), (1, 16, 16)))
    fams = families()
    expect = {"vae": (2000, 120000), "gan": (4000, 8000), "flow": (1500, 10000), "latent-diffusion": (10000, 10000)}
    for name, (few, many) in expect.items():
        cls = fams[name]
        assert cls.train_defaults_for(small)["steps"] == cls.train_defaults_for(edge)["steps"] == few, name
        assert cls.train_defaults_for(large)["steps"] == many, name
        assert {k: v for k, v in cls.train_defaults_for(large).items() if k != "steps"} == {
            k: v for k, v in cls.train_defaults.items() if k != "steps"}, name  # batch and lr as tuned
    diffusion = fams["diffusion"]  # a family without large_train: the same for every size
    assert diffusion.train_defaults_for(large) == diffusion.train_defaults_for(small) == diffusion.train_defaults
