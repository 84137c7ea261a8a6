"""The config layer: diffusers' scheduler_config.json read and written by pygen (no diffusers import
in pygen), round trips in both directions, from_config / from_pretrained / save_pretrained,
compatibles, deprecated values, and the diffusers-API details of the schedulers (dict-like
outputs, tensor init_noise_sigma, custom schedules, step before set_timesteps, add_noise)."""

import json
import warnings

import pytest
import torch

import pygen.diffusion as D

diffusers = pytest.importorskip("diffusers")

NAMES = ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
         "DPMSolverMultistepScheduler", "HeunDiscreteScheduler", "LCMScheduler", "UniPCMultistepScheduler",
         "FlowMatchEulerDiscreteScheduler"]
CFG = {
    "DDPMScheduler": {"beta_schedule": "scaled_linear", "variance_type": "fixed_large", "clip_sample": False},
    "DDIMScheduler": {"beta_start": 0.00085, "beta_end": 0.012, "set_alpha_to_one": False, "steps_offset": 1},
    "EulerDiscreteScheduler": {"use_karras_sigmas": True, "prediction_type": "v_prediction"},
    "EulerAncestralDiscreteScheduler": {"timestep_spacing": "trailing"},
    "DPMSolverMultistepScheduler": {"solver_order": 3, "thresholding": True, "lambda_min_clipped": -5.1},
    "HeunDiscreteScheduler": {"use_exponential_sigmas": True},
    "LCMScheduler": {"original_inference_steps": 40},
    "UniPCMultistepScheduler": {"solver_type": "bh1", "disable_corrector": [1]},
    "FlowMatchEulerDiscreteScheduler": {"shift": 3.0, "use_dynamic_shifting": False},
}


def _quiet():
    w = warnings.catch_warnings()
    w.__enter__()
    warnings.simplefilter("ignore")
    return w


def _same_schedule(a, b, n=7):
    kw = {"num_inference_steps": n}
    a.set_timesteps(**kw)
    b.set_timesteps(**kw)
    torch.testing.assert_close(a.timesteps.double(), b.timesteps.double(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_pygen_folder_loads_into_diffusers(name, tmp_path):
    ours = getattr(D, name)(**CFG[name])
    ours.save_pretrained(tmp_path / "scheduler")
    data = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert data["_class_name"] == name and "_diffusers_version" in data
    _quiet()
    theirs = getattr(diffusers, name).from_pretrained(tmp_path, subfolder="scheduler")
    for k, v in CFG[name].items():
        assert theirs.config[k] == v, k
    for k in theirs.config:
        if not k.startswith("_") and k in ours.config:
            assert theirs.config[k] == ours.config[k] or (k == "trained_betas"), k
    _same_schedule(ours, theirs)


@pytest.mark.parametrize("name", NAMES)
def test_diffusers_folder_loads_into_pygen(name, tmp_path):
    _quiet()
    theirs = getattr(diffusers, name)(**CFG[name])
    theirs.save_config(tmp_path)
    ours = getattr(D, name).from_pretrained(tmp_path)
    for k, v in theirs.config.items():
        if not k.startswith("_"):
            assert ours.config[k] == v, k
    assert ours.config._class_name == name  # hidden entries are kept
    _same_schedule(ours, theirs)
    # and back: what pygen writes, diffusers reads to the same config
    ours.save_config(tmp_path / "again")
    back = getattr(diffusers, name).from_pretrained(tmp_path / "again")
    assert {k: v for k, v in back.config.items() if not k.startswith("_")} == \
        {k: v for k, v in theirs.config.items() if not k.startswith("_")}


def test_unknown_keys_are_kept_and_written_back(tmp_path):
    cfg = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.30.0", "beta_schedule": "scaled_linear",
           "skip_prk_steps": True, "my_key": [1, 2]}
    (tmp_path / "scheduler_config.json").write_text(json.dumps(cfg))
    sch, unused = D.DDIMScheduler.from_pretrained(tmp_path, return_unused_kwargs=True)
    assert sch.config.my_key == [1, 2] and sch.config.skip_prk_steps is True
    assert "my_key" in unused
    sch.save_config(tmp_path / "out")
    out = json.loads((tmp_path / "out" / "scheduler_config.json").read_text())
    assert out["my_key"] == [1, 2] and out["skip_prk_steps"] is True and out["_class_name"] == "DDIMScheduler"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp")]  # atomic: no temp left


def test_from_config_overrides_and_compatibles():
    ddim = D.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False)
    e = D.EulerDiscreteScheduler.from_config(ddim.config, timestep_spacing="trailing")
    assert e.config.beta_start == 0.00085 and e.config.timestep_spacing == "trailing"
    assert e.config._class_name == "EulerDiscreteScheduler" if "_class_name" in e.config else True
    assert e.config.set_alpha_to_one is False  # DDIM's option kept, hidden
    assert D.UniPCMultistepScheduler in ddim.compatibles and D.DDIMScheduler in e.compatibles
    for cls in ddim.compatibles:
        cls.from_config(ddim.config).set_timesteps(5)
    # a diffusers scheduler's config (a FrozenDict) is a config too
    theirs = diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True)
    ours = D.DPMSolverMultistepScheduler.from_config(theirs.config)
    _same_schedule(ours, theirs)
    theirs2 = diffusers.UniPCMultistepScheduler.from_config(ours.config)
    assert theirs2.config.use_karras_sigmas is True


def test_config_is_frozen_with_attribute_access():
    sch = D.DDPMScheduler()
    assert sch.config.num_train_timesteps == sch.config["num_train_timesteps"] == 1000
    with pytest.raises(TypeError):
        sch.config["beta_end"] = 0.5
    with pytest.raises(TypeError):
        sch.config.update(beta_end=0.5)
    sch.register_to_config(beta_end=0.5, extra=1)
    assert sch.config.beta_end == 0.5 and sch.config.extra == 1
    with pytest.raises(AttributeError):
        sch.config.nope
    import copy
    import pickle

    assert pickle.loads(pickle.dumps(sch.config)) == sch.config == copy.deepcopy(sch.config)


@pytest.mark.parametrize("name, kw, expect", [
    ("DPMSolverMultistepScheduler", {"solver_type": "logrho"}, {"solver_type": "midpoint"}),
    ("DPMSolverMultistepScheduler", {"solver_type": "bh2"}, {"solver_type": "midpoint"}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "deis", "final_sigmas_type": "sigma_min"},
     {"algorithm_type": "dpmsolver++"}),
    ("UniPCMultistepScheduler", {"solver_type": "midpoint"}, {"solver_type": "bh2"}),
])
def test_deprecated_values_map_as_in_diffusers(name, kw, expect):
    _quiet()
    ours = getattr(D, name).from_config({**kw})
    theirs = getattr(diffusers, name)(**kw)
    for k, v in expect.items():
        assert ours.config[k] == v == theirs.config[k]
    assert getattr(D, name)(**kw).config[next(iter(expect))] == next(iter(expect.values()))


def test_scheduler_output_is_dict_like():
    sch = D.DDIMScheduler()
    sch.set_timesteps(5)
    x = torch.randn(2, 3)
    out = sch.step(x, sch.timesteps[0], x)
    assert list(out.keys()) == ["prev_sample", "pred_original_sample"]
    assert out[0] is out["prev_sample"] is out.prev_sample and out[1] is out.pred_original_sample
    assert len(out.to_tuple()) == 2 and list(out.values())[0] is out.prev_sample
    tup = sch.step(x, sch.timesteps[0], x, return_dict=False)
    torch.testing.assert_close(tup[0], out[0])
    u = D.UniPCMultistepScheduler()
    u.set_timesteps(5)
    o = u.step(x, u.timesteps[0], x)
    assert list(o.keys()) == ["prev_sample"] and o.to_tuple() == (o.prev_sample,) and o.pred_original_sample is None
    lcm = D.LCMScheduler()
    lcm.set_timesteps(4)
    o = lcm.step(x, lcm.timesteps[0], x)
    assert set(o.keys()) == {"prev_sample", "denoised"} and o.denoised is o["denoised"]


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler"])
def test_init_noise_sigma_is_a_tensor_like_diffusers(name):
    for spacing in ("linspace", "leading"):
        ours, theirs = getattr(D, name)(timestep_spacing=spacing), getattr(diffusers, name)(timestep_spacing=spacing)
        ours.set_timesteps(10)
        theirs.set_timesteps(10)
        assert isinstance(ours.init_noise_sigma, torch.Tensor)
        torch.testing.assert_close(ours.init_noise_sigma, theirs.init_noise_sigma)


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"])
def test_step_before_set_timesteps_as_diffusers(name):
    ours, theirs = getattr(D, name)(), getattr(diffusers, name)()
    x = torch.randn(2, 4, 4, 4)
    t = theirs.timesteps[3]
    mo = torch.sin(x)
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    a = theirs.step(mo, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
    b = ours.step(mo, t, x, noise=z).prev_sample
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
                                  "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
                                  "HeunDiscreteScheduler", "LCMScheduler", "UniPCMultistepScheduler"])
def test_add_noise_broadcasts_one_timestep_over_the_batch(name):
    ours, theirs = getattr(D, name)(), getattr(diffusers, name)()
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    x0, z = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    t = theirs.timesteps[2:3]  # shape (1,)
    torch.testing.assert_close(ours.add_noise(x0, z, t), theirs.add_noise(x0, z, t), rtol=1e-5, atol=1e-5)


def test_save_config_refuses_a_file_and_from_pretrained_a_missing_folder(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(AssertionError, match="directory"):
        D.DDIMScheduler().save_config(f)
    with pytest.raises(FileNotFoundError, match="local"):
        D.DDIMScheduler.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        D.DDIMScheduler.from_pretrained(tmp_path)


def test_pygen_does_not_import_diffusers():
    import subprocess
    import sys

    code = "import sys, pygen.diffusion; assert 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- found by diffusers' own test files (benchmarks/diffusers_yardstick.py) ------------------


class _silenced(warnings.catch_warnings):
    def __enter__(self):
        super().__enter__()
        warnings.simplefilter("ignore")


@pytest.mark.parametrize("name", NAMES)
def test_use_default_values_and_save_load_round_trip_as_diffusers(name, tmp_path):
    """The config notes the keywords left at their defaults (``_use_default_values``, as diffusers'
    register_to_config); saving adds ``_class_name`` / ``_diffusers_version`` to the live config;
    a loaded scheduler's config equals the saved one's less ``_use_default_values``."""
    with _silenced():
        th, us = getattr(diffusers, name)(**CFG[name]), getattr(D, name)(**CFG[name])
    assert set(us.config["_use_default_values"]) == set(th.config["_use_default_values"])
    us.save_pretrained(tmp_path)
    assert us.config["_class_name"] == name and us.config["_diffusers_version"]
    with _silenced():
        back = getattr(D, name).from_pretrained(tmp_path)
    saved = dict(us.config)
    del saved["_use_default_values"]
    assert saved == back.config and "_use_default_values" not in back.config


def test_config_entries_read_as_attributes_warn_as_diffusers():
    s = D.DDIMScheduler()
    s.register_to_config(test_attribute=5)
    with pytest.warns(FutureWarning):
        assert s.test_attribute == 5
    with pytest.raises(AttributeError) as e:
        s.does_not_exist
    assert str(e.value) == "'DDIMScheduler' object has no attribute 'does_not_exist'"


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log",
                                           "learned_range", "other"])
def test_get_variance_matches_diffusers(variance_type):
    with _silenced():
        th = diffusers.DDPMScheduler(variance_type=variance_type)
    us = D.DDPMScheduler(variance_type=variance_type)
    pv = torch.tensor(0.3)
    for t in (0, 487, 999):
        torch.testing.assert_close(us._get_variance(t, predicted_variance=pv), th._get_variance(t, predicted_variance=pv),
                                   equal_nan=True)
    with _silenced():
        th, us = diffusers.DDIMScheduler(set_alpha_to_one=False), D.DDIMScheduler(set_alpha_to_one=False)
    for t, p in ((420, 400), (980, 960), (0, -1)):
        torch.testing.assert_close(us._get_variance(t, p), th._get_variance(t, p))


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_vp_multistep_timestep_off_the_schedule_takes_the_last_index(name):
    """diffusers' DPM-Solver / UniPC step a timestep that is not in the schedule as the last one."""
    with _silenced():
        th, us = getattr(diffusers, name)(), getattr(D, name)()
    for s in (th, us):
        s.set_timesteps(5)
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    with _silenced():
        a = th.step(0.1 * x, 0, x).prev_sample
    b = us.step(0.1 * x, 0, x).prev_sample
    assert us.step_index == th.step_index == 5
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
