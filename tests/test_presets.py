"""``pygen train --preset`` (issue 18, item 4): the families' larger settings for a GPU,
chosen on CUDA, under every setting given, recorded in train.json and kept on resume."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from pygen.cli import UserError, _preset
from pygen.cli.families import FAMILIES
from pygen.models import families

from test_cli import assert_user_error, cli


def test_presets_hold_only_train_keys_and_for_data_options():
    from types import SimpleNamespace

    images = SimpleNamespace(shape=(1, 16, 16), labels=None, kind="image", bins=256)
    points = SimpleNamespace(shape=(2,), labels=None, kind="points", bins=None)
    for name, cls in families().items():
        for preset in cls.presets.values():
            assert set(preset) <= {"train", "model"}, name
            assert set(preset.get("train", {})) <= {"steps", "batch_size", "lr"}, name
            for data in (images, points) if name in ("vae", "flow", "diffusion") else (images,):
                torch.manual_seed(0)
                small = cls.for_data(data).num_parameters()
                big = cls.for_data(data, **preset.get("model", {})).num_parameters()  # options it accepts
                if data is images and preset.get("model"):  # wider where it applies (a UNet's width: images)
                    assert big > small, (name, small, big)
    assert {n for n, c in families().items() if "gpu" in c.presets} >= {"vae", "gan", "flow", "diffusion",
                                                                       "latent-diffusion"}


@pytest.mark.parametrize("device, want", [("cuda", "gpu"), ("cuda:1", "gpu"), ("cpu", "cpu")])
def test_the_gpu_preset_is_chosen_on_cuda(device, want):
    args = argparse.Namespace(preset=None, device=device, out="run", resume=False)
    name, preset = _preset(args, {}, FAMILIES["gan"])
    assert name == want and preset == ({} if want == "cpu" else families()["gan"].presets["gpu"])
    assert _preset(args, {"preset": "cpu"}, FAMILIES["gan"]) == ("cpu", {})  # a resumed run keeps its preset
    assert _preset(args, {"family": "gan"}, FAMILIES["gan"]) == ("cpu", {})  # a run from before presets: cpu
    assert _preset(args, {}, FAMILIES["sr"]) == ("cpu", {})  # a family without one
    resumed = argparse.Namespace(preset=None, device=device, out="run", resume=True)
    assert _preset(resumed, {}, FAMILIES["gan"]) == ("cpu", {})  # --resume without a train.json: as before presets
    with pytest.raises(UserError, match="--preset gpu: the sr family has no such preset"):
        _preset(argparse.Namespace(preset="gpu", device=device, out="run", resume=False), {}, FAMILIES["sr"])


def test_cli_preset_gpu_builds_records_and_resumes(tmp_path):
    run = tmp_path / "gan"
    small = ["--option", "g_hidden=32", "--option", "d_hidden=32", "--z-dim", "8"]
    out = cli("train", "gan", "--data", "digits16", "--out", run, "--preset", "gpu", "--steps", "1", "--batch-size", "8",
              "--no-progress", *small)
    assert "preset gpu: g width 64, d width 64, steps 20000, batch size 128 where not given" in out.stdout
    rec = json.loads((run / "train.json").read_text())
    assert rec["preset"] == "gpu" and rec["options"]["g_width"] == rec["options"]["d_width"] == 64
    assert rec["steps"] == 1 and rec["batch_size"] == 8  # given settings beat the preset
    cli("train", "gan", "--out", run, "--resume", "--steps", "2", "--no-progress")
    again = json.loads((run / "train.json").read_text())
    assert again["preset"] == "gpu" and again["options"] == rec["options"] and again["steps"] == 2
    assert_user_error(cli("train", "gan", "--out", run, "--resume", "--preset", "cpu", "--no-progress", check=False),
                      "was trained with --preset gpu, not cpu")
    cpu = tmp_path / "cpu"
    cli("train", "gan", "--data", "digits16", "--out", cpu, "--steps", "1", "--batch-size", "8", "--no-progress",
        "--width", "8", *small)
    rec = json.loads((cpu / "train.json").read_text())
    assert rec["preset"] == "cpu" and "g_width" not in rec["options"] and rec["options"]["width"] == 8
    assert_user_error(cli("train", "sr", "--data", "patches", "--out", tmp_path / "sr", "--preset", "gpu",
                          "--no-progress", check=False), "--preset gpu: the sr family has no such preset")


def test_num_parameters_leaves_out_the_ema_copies():
    from pygen.models import GAN, VAE, LatentDiffusion

    gan = GAN((1, 16, 16), g_width=8, d_width=8, ema_decay=0.999)
    g, d = (sum(p.numel() for p in m.parameters()) for m in (gan.generator, gan.discriminator))
    assert gan.num_parameters() == g + d < sum(p.numel() for p in gan.parameters())
    ld = LatentDiffusion((1, 8, 8))
    assert ld.num_parameters() == sum(p.numel() for m in (ld.autoencoder, ld.diffusion) for p in m.parameters())
    vae = VAE((1, 8, 8), latent_dim=2, hidden=16, network="mlp")
    assert vae.num_parameters() == sum(p.numel() for p in vae.parameters())


def test_ema_copies_name_the_models_ema_submodules():
    from pygen.models import GAN, LatentDiffusion

    for model in (GAN((1, 16, 16), g_width=8, d_width=8, ema_decay=0.999), LatentDiffusion((1, 8, 8))):
        for name in model.ema_copies:
            assert isinstance(getattr(model, name), torch.nn.Module), name
