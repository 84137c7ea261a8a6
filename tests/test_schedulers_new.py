"""The new schedulers (flow matching, Heun, LCM, UniPC) and the options that used to be refused
(thresholding, learned variances, exponential / beta / Lu sigmas, DPM-Solver orders 1-3 and its
SDE / noise-prediction algorithms): whole sampling loops against diffusers 0.42.1 on the same
inputs and the same noise, fp32, within 1e-4 (relative where the samples grow large)."""

import warnings

import pytest
import torch

import pygen.diffusion as D

diffusers = pytest.importorskip("diffusers")
SHAPE = (2, 4, 8, 8)


def fake_model(x, t):
    """A deterministic stand-in for a network: a fixed smooth function of the input and t."""
    return torch.sin(x * 1.3 + float(t) / 1000.0) * 0.7 + 0.1 * x


def _pair(name, cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(diffusers, name)(**cfg), getattr(D, name)(**cfg)


def run_loop(name, cfg, set_kw, noise=None, stop=None):
    """Both schedulers on the same inputs; returns (diffusers' final sample, pygen's)."""
    th, us = _pair(name, cfg)
    th.set_timesteps(**set_kw)
    us.set_timesteps(**set_kw)
    torch.testing.assert_close(us.timesteps.double(), th.timesteps.double(), rtol=0, atol=1e-4)
    torch.testing.assert_close(us.sigmas.double(), th.sigmas.double(), rtol=1e-6, atol=1e-7) if hasattr(th, "sigmas") else None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g) * float(getattr(us, "init_noise_sigma", 1.0))
    xa, xb = x.clone(), x.clone()
    for k, t in enumerate(th.timesteps[:stop]):
        inp = th.scale_model_input(xa, t) if hasattr(th, "scale_model_input") else xa
        if hasattr(us, "scale_model_input"):
            torch.testing.assert_close(us.scale_model_input(xa.clone(), us.timesteps[k]), inp)
        mo = fake_model(inp, t)
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + k))
        kw_a, kw_b = {}, {}
        if noise == "generator":  # diffusers draws torch.randn(shape, generator=...) on CPU: z
            kw_a, kw_b = {"generator": torch.Generator().manual_seed(100 + k)}, {"noise": z}
        elif noise == "variance_noise":
            kw_a = kw_b = {"variance_noise": z}
        xa = th.step(mo, t, xa, **kw_a).prev_sample
        xb = us.step(mo, us.timesteps[k], xb, **kw_b).prev_sample
    return xa, xb


def assert_parity(xa, xb):
    assert torch.isfinite(xb).all()
    scale = max(1.0, xa.abs().max().item())
    torch.testing.assert_close(xb, xa, rtol=0, atol=1e-4 * scale)


N10 = {"num_inference_steps": 10}
CASES = [
    # flow matching (SD3 / Flux)
    ("FlowMatchEulerDiscreteScheduler", {}, N10, None),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, N10, None),
    ("FlowMatchEulerDiscreteScheduler", {"use_dynamic_shifting": True}, {"num_inference_steps": 8, "mu": 0.8}, None),
    ("FlowMatchEulerDiscreteScheduler", {"use_dynamic_shifting": True, "time_shift_type": "linear"},
     {"num_inference_steps": 8, "mu": 2.0}, None),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0, "shift_terminal": 0.1}, N10, None),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0, "use_karras_sigmas": True}, N10, None),
    ("FlowMatchEulerDiscreteScheduler", {"use_exponential_sigmas": True}, N10, None),
    ("FlowMatchEulerDiscreteScheduler", {"use_beta_sigmas": True}, N10, None),
    ("FlowMatchEulerDiscreteScheduler", {"invert_sigmas": True}, N10, None),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, {"sigmas": [1.0, 0.8, 0.5, 0.3, 0.1]}, None),
    ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}, N10, "generator"),
    # Heun
    ("HeunDiscreteScheduler", {}, N10, None),
    ("HeunDiscreteScheduler", {"use_karras_sigmas": True, "prediction_type": "v_prediction"}, N10, None),
    ("HeunDiscreteScheduler", {"beta_schedule": "scaled_linear", "timestep_spacing": "leading", "steps_offset": 1}, N10, None),
    ("HeunDiscreteScheduler", {"clip_sample": True, "prediction_type": "sample"}, N10, None),
    ("HeunDiscreteScheduler", {"beta_schedule": "exp"}, N10, None),
    ("HeunDiscreteScheduler", {"use_exponential_sigmas": True}, N10, None),
    ("HeunDiscreteScheduler", {}, {"timesteps": [999, 800, 500, 200, 10]}, None),
    # LCM
    ("LCMScheduler", {}, {"num_inference_steps": 4}, "generator"),
    ("LCMScheduler", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, {"num_inference_steps": 6}, "generator"),
    ("LCMScheduler", {"thresholding": True, "sample_max_value": 1.5}, {"num_inference_steps": 4}, "generator"),
    ("LCMScheduler", {"clip_sample": True}, {"timesteps": [999, 759, 499, 259]}, "generator"),
    # UniPC
    ("UniPCMultistepScheduler", {}, N10, None),
    ("UniPCMultistepScheduler", {"solver_order": 1}, N10, None),
    ("UniPCMultistepScheduler", {"solver_order": 3}, N10, None),
    ("UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}, N10, None),
    ("UniPCMultistepScheduler", {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}, N10, None),
    ("UniPCMultistepScheduler", {"solver_order": 3, "predict_x0": False, "prediction_type": "v_prediction",
                                 "final_sigmas_type": "sigma_min"}, N10, None),
    ("UniPCMultistepScheduler", {"use_karras_sigmas": True, "thresholding": True}, N10, None),
    ("UniPCMultistepScheduler", {"disable_corrector": [0, 2], "timestep_spacing": "trailing"}, N10, None),
    ("UniPCMultistepScheduler", {"use_exponential_sigmas": True}, N10, None),
    ("UniPCMultistepScheduler", {"use_beta_sigmas": True, "prediction_type": "sample"}, N10, None),
    # DPM-Solver: orders, algorithms, sigmas, thresholding
    ("DPMSolverMultistepScheduler", {"solver_order": 1}, N10, None),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}, N10, None),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "lower_order_final": False}, {"num_inference_steps": 20}, None),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, N10, "variance_noise"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "solver_type": "heun"},
     N10, "variance_noise"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, N10, None),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_order": 3,
                                     "prediction_type": "v_prediction"}, N10, None),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min",
                                     "solver_type": "heun"}, N10, None),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}, N10,
     "variance_noise"),
    ("DPMSolverMultistepScheduler", {"thresholding": True, "sample_max_value": 1.5}, N10, None),
    ("DPMSolverMultistepScheduler", {"thresholding": True, "algorithm_type": "dpmsolver",
                                     "final_sigmas_type": "sigma_min"}, N10, None),
    ("DPMSolverMultistepScheduler", {"use_lu_lambdas": True}, N10, None),
    ("DPMSolverMultistepScheduler", {"use_exponential_sigmas": True}, N10, None),
    ("DPMSolverMultistepScheduler", {"use_beta_sigmas": True}, N10, None),
    ("DPMSolverMultistepScheduler", {"solver_type": "logrho"}, N10, None),
    ("DPMSolverMultistepScheduler", {}, {"timesteps": [999, 700, 400, 100]}, None),
    # Euler: exponential / beta sigmas, custom timesteps / sigmas
    ("EulerDiscreteScheduler", {"use_exponential_sigmas": True}, N10, None),
    ("EulerDiscreteScheduler", {"use_beta_sigmas": True}, N10, None),
    ("EulerDiscreteScheduler", {}, {"timesteps": [999, 700, 400, 100]}, None),
    ("EulerDiscreteScheduler", {}, {"sigmas": [14.0, 5.0, 2.0, 0.5, 0.1, 0.0]}, None),
    # DDPM / DDIM options
    ("DDIMScheduler", {"thresholding": True, "clip_sample": False, "sample_max_value": 2.0}, N10, None),
    ("DDIMScheduler", {"thresholding": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
                       "rescale_betas_zero_snr": True}, N10, None),
    ("DDPMScheduler", {"thresholding": True, "sample_max_value": 2.0}, N10, "generator"),
    ("DDPMScheduler", {"variance_type": "fixed_small_log"}, N10, "generator"),
    # found by diffusers' own test files (benchmarks/diffusers_yardstick.py)
    ("DDPMScheduler", {"variance_type": "other"}, N10, "generator"),  # an unnamed type: fixed_small there
    ("EulerDiscreteScheduler", {"interpolation_type": "log_linear"}, N10, None),
    ("EulerDiscreteScheduler", {"interpolation_type": "log_linear", "final_sigmas_type": "sigma_min",
                                "prediction_type": "v_prediction"}, N10, None),
    ("EulerDiscreteScheduler", {"timestep_type": "continuous", "prediction_type": "v_prediction"}, N10, None),
    ("UniPCMultistepScheduler", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, N10, None),
    ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction"},
     N10, None),
    ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "use_karras_sigmas": True, "sigma_min": 0.01,
                                 "sigma_max": 200.0, "prediction_type": "flow_prediction"}, N10, None),
    ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "use_dynamic_shifting": True,
                                 "prediction_type": "flow_prediction"}, {"num_inference_steps": 8, "mu": 0.8}, None),
]


@pytest.mark.parametrize("name, cfg, set_kw, noise", CASES,
                         ids=[f"{n.replace('Scheduler', '')}-{i}" for i, (n, *_) in enumerate(CASES)])
def test_loop_matches_diffusers(name, cfg, set_kw, noise):
    assert_parity(*run_loop(name, cfg, set_kw, noise))


def test_unipc_bh1_final_zero_sigma_is_finite():
    """diffusers' bh1 predictor multiplies B_h = -inf by a zero residual on a final sigma of 0
    (NaN); pygen leaves the zero term out: every step before the last one matches."""
    xa, xb = run_loop("UniPCMultistepScheduler", {"solver_type": "bh1"}, N10, stop=9)
    assert_parity(xa, xb)


@pytest.mark.parametrize("variance_type", ["learned_range", "learned"])
def test_ddpm_learned_variance_matches_diffusers(variance_type):
    th, us = _pair("DDPMScheduler", {"variance_type": variance_type})
    th.set_timesteps(10)
    us.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    xa = torch.randn(SHAPE, generator=g)
    xb = xa.clone()
    for k, t in enumerate(th.timesteps):
        mo = fake_model(xa, t)
        var = torch.tanh(xa) * 0.9 if variance_type == "learned_range" else 0.01 + 0.005 * torch.sigmoid(xa)
        full = torch.cat([mo, var], dim=1)
        xa = th.step(full, t, xa, generator=torch.Generator().manual_seed(k)).prev_sample
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(k))
        xb = us.step(full, us.timesteps[k], xb, noise=z).prev_sample
    assert_parity(xa, xb)


def test_flow_match_is_the_fused_euler_step():
    us = D.FlowMatchEulerDiscreteScheduler(shift=3.0)
    us.set_timesteps(5)
    x, v = torch.randn(SHAPE), torch.randn(SHAPE)
    out = us.step(v, us.timesteps[0], x)
    s, sn = us.sigmas[0], us.sigmas[1]
    torch.testing.assert_close(out.prev_sample, x + (sn - s) * v)
    torch.testing.assert_close(out.pred_original_sample, x - s * v)  # the flow's x0
    with pytest.raises(ValueError, match="integer indices"):
        us.step(v, 3, x)
    torch.testing.assert_close(us.scale_noise(x, us.timesteps[:1], v), s * v + (1 - s) * x)


@pytest.mark.parametrize("name, cfg", [("LCMScheduler", {}), ("DDIMScheduler", {"thresholding": True}),
                                       ("DDPMScheduler", {"thresholding": True}),
                                       ("DDPMScheduler", {"variance_type": "learned_range"})])
def test_per_sample_timesteps_equal_single(name, cfg):
    """A (B,) timestep tensor steps each sample as if it were stepped alone."""
    sch = getattr(D, name)(**cfg)
    sch.set_timesteps(4)
    ts = sch.timesteps
    t = torch.stack([ts[0], ts[-1], ts[1]])
    x = torch.randn(3, 2, 4, 4) * 2
    c = 4 if cfg.get("variance_type") == "learned_range" else 2
    mo = torch.randn(3, c, 4, 4)
    z = torch.randn(3, 2, 4, 4)
    both = sch.step(mo, t, x, noise=z)
    for i in range(3):
        sch._step_index = None if name == "LCMScheduler" else getattr(sch, "_step_index", None)
        one = sch.step(mo[i:i + 1], t[i:i + 1], x[i:i + 1], noise=z[i:i + 1])
        torch.testing.assert_close(both.prev_sample[i:i + 1], one.prev_sample, rtol=1e-5, atol=1e-5)


def test_heun_state_and_order():
    us = D.HeunDiscreteScheduler()
    assert us.order == 2 and us.num_inference_steps == 1000
    us.set_timesteps(4)
    assert len(us.timesteps) == 7 and us.state_in_first_order
    x = torch.randn(SHAPE)
    us.step(torch.zeros(SHAPE), us.timesteps[0], x * us.init_noise_sigma)
    assert not us.state_in_first_order


def test_stochastic_steps_draw_pygen_noise_from_generator():
    for make in (lambda: D.LCMScheduler(), lambda: D.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"),
                 lambda: D.FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)):
        outs = []
        for seed in (5, 5, 6):
            sch = make()
            sch.set_timesteps(4)
            x = torch.zeros(SHAPE)
            outs.append(sch.step(torch.zeros(SHAPE), sch.timesteps[0], x,
                                 generator=torch.Generator().manual_seed(seed)).prev_sample)
        assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
