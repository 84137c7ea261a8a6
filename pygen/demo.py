"""Large-batch sampling demo: ``python -m pygen.demo`` (``make demo``).

1. VAE: draws latent samples z ~ N(mu, sigma) and their KL for a big batch, the inner loop
   of VAE training and sampling jobs, with pygen's fused op and with the chain of torch ops
   people write by hand, and prints the throughput of each. Also shows that a sample's
   noise is fixed by (seed, offset): drawing the batch in chunks gives the same z.
2. Diffusion: a DDIM sampling loop (``--steps`` steps over ``--images`` 3x64x64 images)
   through pygen's DDIMScheduler (fused steps) and through the unfused reference step, with
   a stand-in denoiser (one elementwise op, so the figures are the sampler's own cost).
"""

from __future__ import annotations

import argparse
import time

import torch

import pygen
from pygen.ops import reparameterize_kl


def _eager(mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    kl = 0.5 * (torch.exp(logvar) + mu * mu - 1 - logvar).flatten(1).sum(1)
    return z, kl


def _time(fn, repeats: int, device: torch.device) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=65536)
    p.add_argument("--latent", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--images", type=int, default=256, help="diffusion batch (3x64x64 images)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)

    torch.manual_seed(0)
    mu = torch.randn(args.batch, args.latent, device=device)
    logvar = 0.1 * torch.randn(args.batch, args.latent, device=device)
    print(f"pygen {pygen.__version__} | torch {torch.__version__} | device {device} | "
          f"backends {pygen.available_backends()}")
    print(f"batch {args.batch} x latent {args.latent} = {mu.numel() / 1e6:.1f}M elements, float32")

    n = args.batch
    with torch.no_grad():
        t_pygen = _time(lambda: reparameterize_kl(mu, logvar), args.repeats, device)
        t_eager = _time(lambda: _eager(mu, logvar), args.repeats, device)
        bytes_moved = 3 * mu.numel() * 4 + n * 4  # read mu, logvar; write z, kl
        for name, t in (("pygen reparameterize_kl", t_pygen), ("torch eager chain", t_eager)):
            print(f"  {name:24s} {t * 1e3:8.2f} ms  {n / t / 1e6:8.2f} M samples/s  "
                  f"{bytes_moved / t / 1e9:6.1f} GB/s (useful bytes)")
        print(f"  speedup vs eager: {t_eager / t_pygen:.2f}x")

        z, kl = reparameterize_kl(mu, logvar, seed=1234)
        half = n // 2
        z_a, _ = reparameterize_kl(mu[:half], logvar[:half], seed=1234)
        z_b, _ = reparameterize_kl(mu[half:], logvar[half:], seed=1234, offset=half * args.latent)
        same = torch.equal(torch.cat([z_a, z_b]), z)
        print(f"  chunked draw equals the whole-batch draw: {same}")
        print(f"  mean KL per sample: {kl.mean().item():.3f} nats")
        _diffusion(args, device)


def _diffusion(args, device: torch.device) -> None:
    from pygen.diffusion import DDIMScheduler
    from pygen.ops import diffusion as R

    print(f"DDIM, {args.steps} steps over {args.images} x 3 x 64 x 64 float32 (stand-in denoiser)")
    sched = DDIMScheduler(clip_sample=False)
    sched.set_timesteps(args.steps, device=device)
    ac = sched.alphas_cumprod.to(device)
    ratio = sched.num_train_timesteps // args.steps
    x_init = torch.randn(args.images, 3, 64, 64, device=device)

    def denoiser(x):
        return torch.tanh(x) * 0.5

    def fused():
        x = x_init
        for t in sched.timesteps:
            x = sched.step(denoiser(x), t, x).prev_sample
        return x

    def unfused():  # the chain of ops of the reference step, coefficients gathered per step
        x = x_init
        for t in sched.timesteps.tolist():
            ab = ac[t]
            ab_prev = ac[t - ratio] if t - ratio >= 0 else torch.ones((), device=device)
            x = R.ddim_step_ref(denoiser(x), x, ab, ab_prev)[0]
        return x

    t_f = _time(fused, max(2, args.repeats // 3), device)
    t_u = _time(unfused, max(2, args.repeats // 3), device)
    for name, t in (("pygen DDIMScheduler", t_f), ("unfused reference step", t_u)):
        print(f"  {name:24s} {t * 1e3:8.1f} ms per loop  {args.images * args.steps / t:10.0f} image-steps/s")
    print(f"  speedup: {t_u / t_f:.2f}x; same samples (max |diff|): {(fused() - unfused()).abs().max().item():.1e}")


if __name__ == "__main__":
    main()
