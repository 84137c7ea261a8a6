"""``pygen train --minutes M`` (issue 18, item 4): the step count comes from a throughput probe
on a copy of the model that leaves the real run untouched, is written to train.json, and a
resume continues to it exactly."""

from __future__ import annotations

import json

import pytest
import torch

from pygen.models import VAE
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
    assert json.loads((run / "train.json").read_text())["steps"] == rec["steps"]
    assert (run / "latest").read_text().strip() == f"ckpt-{rec['steps']}.pt", again.stdout
    assert_user_error(cli("train", "vae", "--out", run, "--resume", "--minutes", "1", "--no-progress", check=False),
                      "--minutes sets the step count of a new run")
    assert_user_error(cli("train", "vae", "--data", "digits", "--out", tmp_path / "b", "--minutes", "1", "--steps",
                          "5", "--no-progress", check=False), "give --steps or --minutes, not both")
    assert_user_error(cli("train", "vae", "--data", "digits", "--out", tmp_path / "c", "--minutes", "0",
                          "--no-progress", check=False), "--minutes")
