"""Whole sampling loops, one short function per sampler (k-diffusion's shape), on pygen's fused
steps (:mod:`pygen.ops.diffusion`), the same steps the diffusers-compatible schedulers of
:mod:`pygen.diffusion.schedulers` take one at a time.

Every sampler takes a denoiser ``model(x_t, sigma) -> prediction`` of alpha-space samples
x_t = sqrt(ab) x0 + sqrt(1 - ab) eps (B, ...) at noise levels ``sigma`` (B,) (sigma =
sqrt((1 - ab) / ab), the VP level in sigma space), whose output is of ``prediction_type``
("epsilon", "v_prediction" or "sample"), and unit noise (B, ...); it returns x0. Stochastic
samplers read the noise of step k from ``seeds[k]`` at stream ``offset`` (the chunk's first
element), so sample i depends on (seeds, offset + i) only; nothing synchronises with the host,
so a loop can be captured in a CUDA graph.

- alpha-space samplers over timesteps of the training chain: :func:`sample_ddpm` (ancestral),
  :func:`sample_ddim` (``eta`` > 0: stochastic);
- sigma-space samplers over a table of levels ``sigmas`` (steps + 1,) ending at 0:
  :func:`sample_euler`, :func:`sample_euler_ancestral` (their state is the sigma-space sample
  x0 + sigma eps, the model sees it divided by sqrt(sigma^2 + 1)) and :func:`sample_dpmpp_2m`
  (DPM-Solver++ 2M on the alpha-space sample, as diffusers' scheduler);
- inpainting: :func:`sample_repaint` (RePaint on the DDPM chain).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

from torch import Tensor

from pygen.ops.diffusion import ddim_step, ddpm_step, dpmpp_2m_step, euler_ancestral_step, euler_step, q_sample
from pygen.ops.gaussian import randn

__all__ = ["Denoiser", "sample_ddpm", "sample_ddim", "sample_euler", "sample_euler_ancestral", "sample_dpmpp_2m",
           "sample_repaint", "repaint_schedule", "ALPHA_SAMPLERS", "SIGMA_SAMPLERS", "DEFAULT_STEPS"]

Denoiser = Callable[[Tensor, Tensor], Tensor]

#: sampler -> default number of steps
DEFAULT_STEPS = {"ddpm": 1000, "ddim": 50, "euler": 50, "euler_ancestral": 50, "dpmpp_2m": 20}


def _steps(n: int, progress: bool, desc: str) -> Iterable[int]:
    if not progress:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=desc, leave=False)


def sample_ddpm(model: Denoiser, noise: Tensor, timesteps: Sequence[int], alphas_cumprod: Tensor, train_sigmas: Tensor,
                *, prediction_type: str, seeds: Tensor, offset: int, progress: bool = False) -> Tensor:
    """DDPM's ancestral chain over ``timesteps`` (descending training timesteps)."""
    x, n, steps = noise, noise.shape[0], len(timesteps)
    for k in _steps(steps, progress, f"ddpm {steps} steps"):
        t, prev = int(timesteps[k]), (int(timesteps[k + 1]) if k + 1 < steps else -1)
        out = model(x, train_sigmas[t].float().expand(n).to(x.device))
        x, _ = ddpm_step(out, x, t, alphas_cumprod, prev, prediction_type=prediction_type, seed=seeds[k : k + 1],
                         offset=offset, return_x0=False)
    return x


def sample_ddim(model: Denoiser, noise: Tensor, timesteps: Sequence[int], alphas_cumprod: Tensor, train_sigmas: Tensor,
                *, prediction_type: str, seeds: Tensor, offset: int, eta: float = 0.0,
                progress: bool = False) -> Tensor:  # fmt: skip
    """DDIM over ``timesteps``; ``eta`` > 0 adds that fraction of DDPM's noise (seeded)."""
    x, n, steps = noise, noise.shape[0], len(timesteps)
    for k in _steps(steps, progress, f"ddim {steps} steps"):
        t, prev = int(timesteps[k]), (int(timesteps[k + 1]) if k + 1 < steps else -1)
        out = model(x, train_sigmas[t].float().expand(n).to(x.device))
        x, _ = ddim_step(out, x, t, alphas_cumprod, prev, eta=eta, prediction_type=prediction_type,
                         seed=seeds[k : k + 1] if eta > 0 else None, offset=offset, return_x0=False)
    return x


def _sigma_loop(model: Denoiser, noise: Tensor, sigmas: Tensor, name: str, progress: bool,
                step: Callable[[Tensor, Tensor, int], Tensor]) -> Tensor:
    """The Euler-type loop on the sigma-space sample x0 + sigma eps: the model sees x / sqrt(sigma^2 + 1)."""
    n, steps = noise.shape[0], sigmas.shape[0] - 1
    x = noise * (sigmas[0] ** 2 + 1).sqrt()
    for k in _steps(steps, progress, f"{name} {steps} steps"):
        s = sigmas[k]
        x = step(model(x / (s * s + 1).sqrt(), s.expand(n)), x, k)
    return x


def sample_euler(model: Denoiser, noise: Tensor, sigmas: Tensor, *, prediction_type: str,
                 progress: bool = False) -> Tensor:  # fmt: skip
    """Euler's method on the probability-flow ODE over the levels ``sigmas`` (steps + 1,)."""
    return _sigma_loop(model, noise, sigmas, "euler", progress, lambda out, x, k: euler_step(
        out, x, sigmas, k, prediction_type=prediction_type, return_x0=False)[0])


def sample_euler_ancestral(model: Denoiser, noise: Tensor, sigmas: Tensor, *, prediction_type: str, seeds: Tensor,
                           offset: int, progress: bool = False) -> Tensor:  # fmt: skip
    """Euler-ancestral (k-diffusion's): an Euler step down to sigma_down, then noise up to the next level."""
    return _sigma_loop(model, noise, sigmas, "euler_ancestral", progress, lambda out, x, k: euler_ancestral_step(
        out, x, sigmas, k, prediction_type=prediction_type, seed=seeds[k : k + 1], offset=offset,
        return_x0=False)[0])


def sample_dpmpp_2m(model: Denoiser, noise: Tensor, sigmas: Tensor, *, prediction_type: str,
                    progress: bool = False) -> Tensor:  # fmt: skip
    """DPM-Solver++ 2M (multistep, second order) on the alpha-space sample over ``sigmas``."""
    x, prev_x0, n, steps = noise, None, noise.shape[0], sigmas.shape[0] - 1
    for k in _steps(steps, progress, f"dpmpp_2m {steps} steps"):
        out = model(x, sigmas[k].expand(n))
        x, prev_x0 = dpmpp_2m_step(out, x, sigmas, k, prev_x0, prediction_type=prediction_type)
    return x


#: the samplers over timesteps of the training chain, and those over a table of sigmas
ALPHA_SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim}
SIGMA_SAMPLERS = {"euler": sample_euler, "euler_ancestral": sample_euler_ancestral, "dpmpp_2m": sample_dpmpp_2m}


# ---- inpainting ------------------------------------------------------------------------------


def repaint_schedule(steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """RePaint's time sequence (Lugmayr et al. 2022) over step indices steps-1 .. 0 then -1:
    every ``jump_length`` steps down, go ``jump_length`` back up, ``jump_n_sample - 1`` times.
    Consecutive entries a, b: b < a is a denoising step, b = a + 1 a re-noising step."""
    jumps = {j: jump_n_sample - 1 for j in range(0, steps - jump_length, jump_length)}
    t, out = steps, []
    while t >= 1:
        t -= 1
        out.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                out.append(t)
    return [*out, -1]


def sample_repaint(model: Denoiser, noise: Tensor, known: Tensor, mask: Tensor, timesteps: Sequence[int],
                   alphas_cumprod: Tensor, train_sigmas: Tensor, *, prediction_type: str, jump_length: int,
                   jump_n_sample: int, seed_of: Callable[[str, int], int], progress: bool = False) -> Tensor:
    """RePaint (Lugmayr et al. 2022) over ``timesteps`` (descending training timesteps): each
    DDPM step down is followed by replacing the known region (``mask`` 1) by ``known`` x0
    noised to the new level; every ``jump_length`` steps the chain is re-noised
    ``jump_length`` levels up (``jump_n_sample - 1`` times). Event e of the schedule reads
    seeds ``seed_of(kind, e)`` for kind "step" (the DDPM noise), "known" (the known region's
    noise) and "jump" (the re-noising). Returns x0 with the known region exact."""
    levels = list(reversed([int(t) for t in timesteps]))  # ascending: index a is level levels[a]
    sched = repaint_schedule(len(levels), jump_length, jump_n_sample)
    pairs: Iterable[tuple[int, int]] = list(zip(sched[:-1], sched[1:]))
    if progress:
        from tqdm.auto import tqdm

        pairs = tqdm(pairs, desc="inpaint", leave=False)
    x, n = noise, noise.shape[0]
    for e, (a, c) in enumerate(pairs):
        if c < a:  # denoise from level levels[a] to levels[c] (c = -1: to x0)
            t, prev = levels[a], (levels[c] if c >= 0 else -1)
            out = model(x, train_sigmas[t].float().expand(n).to(x.device))
            x, _ = ddpm_step(out, x, t, alphas_cumprod, prev, prediction_type=prediction_type,
                             seed=seed_of("step", e), offset=0, return_x0=False)
            noised = known if prev < 0 else q_sample(known, prev, alphas_cumprod, seed=seed_of("known", e))
            x = mask * noised + (1 - mask) * x
        else:  # re-noise one level up: x_c = sqrt(ab_c / ab_a) x_a + sqrt(1 - ab_c / ab_a) z
            r = (alphas_cumprod[levels[c]].double() / alphas_cumprod[levels[a]].double()).item()
            z = randn(*x.shape, seed=seed_of("jump", e), offset=0, device=x.device, dtype=x.dtype)
            x = math.sqrt(r) * x + math.sqrt(1 - r) * z
    return x
