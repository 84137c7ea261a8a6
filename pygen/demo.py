"""``pygen demo`` (``make demo``): every model family trained, sampled and evaluated on the digits.

:func:`run` trains small VAE, GAN, flow and diffusion models on scikit-learn's 8x8 digits with
each family's default configuration (``for_data`` and ``train_defaults`` on its model class; fewer steps with
``quick``), samples each through the sampling job (:func:`pygen.sampling.sample_to_dir`:
shards, manifest, grid), scores each with :func:`pygen.metrics.evaluate` beside the
held-out-data floor and the fitted-Gaussian bar, and writes ``DIR/report.md`` (sample grids,
training curves from ``metrics.jsonl``, the metrics table) and ``DIR/report.json``.

:func:`kernels` (``pygen demo --kernels``) is the fused-kernel throughput demo:

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
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

import pygen
from pygen.ops import reparameterize_kl

__all__ = ["run", "kernels", "DEMO_FAMILIES"]

DEMO_FAMILIES = ("vae", "gan", "flow", "diffusion")
#: --quick: steps per family (the full demo uses the command line's defaults)
QUICK_STEPS = {"vae": 300, "gan": 300, "flow": 200, "diffusion": 300}
#: the full demo: the command line's defaults, except diffusion (6000 steps, ~15 min on one
#: core, is its own budget; the demo's whole budget is ~10 min)
FULL_STEPS = {"diffusion": 2500}
#: samples drawn per family through the sampling job (evaluate scores the first 355)
N_SAMPLES = {False: 2000, True: 400}
_CURVE_SKIP = {"step", "lr", "steps_per_s", "samples_per_s"}


def _curves(metrics: Path, path: Path, title: str) -> Path | None:
    """A PNG of the loss terms in metrics.jsonl against the step (matplotlib, Agg)."""
    if not metrics.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    keys = list(dict.fromkeys(k for r in recs for k in r))
    if "bpd" in keys:  # flows: bits/dim reads better than nats per image
        want = ["bpd", "eval/bpd", "eval_ema/bpd"]
    elif "loss_d" in keys:  # GANs: the two players
        want = ["loss_d", "loss_g", "d_real", "d_fake"]
    else:
        want = ["loss", "eval/loss", "eval_ema/loss", "recon", "kl"]
    train_keys, eval_keys = [k for k in want if k in keys and "/" not in k], [k for k in want if k in keys and "/" in k]
    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=100)
    for k in train_keys + eval_keys:
        pts = [(r["step"], r[k]) for r in recs if k in r]
        ax.plot(*zip(*pts), label=k, marker="o" if len(pts) < 4 else None, lw=1.2,
                ls="--" if "/" in k else "-")
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    from pygen._io import write_atomic

    write_atomic(path, lambda f: fig.savefig(f, format="png"), "wb")
    plt.close(fig)
    return path


def _train(name: str, run_dir: Path, quick: bool, data: str = "digits", minutes: float | None = None) -> dict[str, Any]:
    import pygen.data
    import pygen.models
    from pygen.models.labels import training_data
    from pygen.models.latent import latent_by_default
    from pygen.train import fit
    from pygen.train.budget import stage_options

    train, test = pygen.data.train_test(pygen.data.load(data))
    family = "latent-diffusion" if name == "diffusion" and latent_by_default(tuple(train.shape)) else name
    cls = pygen.models.families()[family]
    settings = {"seed": 0, **cls.train_defaults_for(train)}
    default_steps = settings["steps"]
    torch.manual_seed(settings["seed"])
    model = cls.for_data(train)
    if minutes is None and data == "digits":
        cap = QUICK_STEPS if quick else FULL_STEPS
        if name in cap:
            settings["steps"] = min(settings["steps"], cap[name])
    else:  # other data: each family's default steps, cut to a wall-clock budget measured here
        from pygen.train.budget import plan_for_minutes

        minutes = minutes if minutes is not None else (1.0 if quick else 5.0)
        fits, _, _ = plan_for_minutes(model, training_data(model, train), minutes, batch_size=settings["batch_size"],
                                      lr=settings["lr"])
        settings["steps"] = min(settings["steps"], fits)
    stages = stage_options(model, settings["steps"])
    if stages:  # both stages in a short run
        torch.manual_seed(settings["seed"])
        model = cls.for_data(train, **stages)
    record = run_dir / "demo-train.json"  # a finished run is reused (with its measured time) on a re-run
    nparams = model.num_parameters()  # without EMA copies
    if record.exists() and json.loads(record.read_text()).get("steps") == settings["steps"]:
        seconds = json.loads(record.read_text())["train_seconds"]
        print(f"[{name}] reusing the finished run in {run_dir} (trained in {seconds:.0f} s)", flush=True)
    else:
        t0 = time.perf_counter()
        print(f"[{name}] training {nparams:,} parameters: {settings['steps']} steps of {settings['batch_size']} "
              f"-> {run_dir}", flush=True)
        every = max(1, settings["steps"] // 20)
        fit(model, training_data(model, train), steps=settings["steps"], batch_size=settings["batch_size"],
            lr=settings["lr"], seed=settings["seed"], out=run_dir, resume=True, progress=sys.stderr.isatty(),
            log_every=every, eval_every=max(every, settings["steps"] // 5), eval_data=training_data(model, test),
            checkpoint_every=settings["steps"])  # fmt: skip
        seconds = time.perf_counter() - t0
        from pygen._io import write_text_atomic

        write_text_atomic(record, json.dumps({"steps": settings["steps"], "train_seconds": seconds}) + "\n")
    return {**settings, "default_steps": default_steps, "train_seconds": seconds, "parameters": nparams,
            "family": family, "data": data, "n_train": len(train), "shape": list(train.shape)}


def run(out: str | Path = "pygen-demo", *, quick: bool = False, families: list[str] | None = None,
        threads: int | None = 1, data: str = "digits", minutes: float | None = None) -> Path:  # fmt: skip
    """Train, sample and evaluate each family on ``data`` (the digits by default); write
    ``out/report.md``. Returns its path. Other data (e.g. "fashion-mnist"): each family's
    default steps cut to ``minutes`` of this machine (default 5, --quick 1; measured), and
    diffusion in latent space where :func:`pygen.models.latent.latent_by_default` says so.

    Re-running with the same ``out`` reuses finished training runs and sampling jobs (both
    resume), so an interrupted demo continues where it stopped.
    """
    from pygen.metrics import evaluate, format_table
    from pygen.models import load
    from pygen.sampling import sample_to_dir

    if threads:
        torch.set_num_threads(threads)
    out = Path(out) / ((f"{data.replace(':', '-').replace('/', '_')}-" if data != "digits" else "")
                       + ("quick" if quick else "full"))
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    results: dict[str, Any] = {}
    for name in families or DEMO_FAMILIES:
        run_dir = out / "runs" / name
        info = _train(name, run_dir, quick, data, minutes)
        # an EMA of decay 0.999 still holds mostly the initial weights after a few hundred steps
        ema = not quick
        model = load(run_dir, ema=ema)
        n = N_SAMPLES[quick]
        kw: dict[str, Any] = {"ema": ema}
        t0 = time.perf_counter()
        manifest = sample_to_dir(run_dir, n, out / "samples" / name, batch_size=500, seed=0,
                                 progress=sys.stderr.isatty(), **kw)
        sample_s = time.perf_counter() - t0
        print(f"[{name}] sampled {n} in {sample_s:.1f} s -> {out / 'samples' / name}", flush=True)
        t0 = time.perf_counter()
        ev = evaluate(model, data, seed=0, n=None if data == "digits" else N_SAMPLES[quick])
        eval_s = time.perf_counter() - t0
        print(f"[{name}] evaluated in {eval_s:.1f} s: FD {ev['fd']:.3g} (fitted-Gaussian bar "
              f"{ev['baseline_gaussian']['fd']:.3g}, held-out floor {ev['baseline_data']['fd']:.3g})", flush=True)
        _curves(run_dir / "metrics.jsonl", out / "curves" / f"{name}.png", f"{name}: training log")
        results[name] = {**info, "sample_seconds": sample_s, "samples": n, "eval_seconds": eval_s,
                         "sampling": {k: manifest[k] for k in ("n", "seed", "shard_size", "sampler", "checkpoint_sha256")},
                         "evaluate": ev, "table": format_table(ev), "config": model.config, "ema": ema}
    total = time.perf_counter() - t_start
    report = _write_report(out, results, quick=quick, total=total)
    print(f"\nreport: {report}  ({total:.0f} s in all; open it in a Markdown viewer)")
    return report


def _write_report(out: Path, results: dict[str, Any], *, quick: bool, total: float) -> Path:
    from pygen._io import write_text_atomic

    done = {k: v for k, v in results.items() if "evaluate" in v}
    first = next(iter(done.values()), None)
    lines = [f"# pygen demo{' (--quick: too few steps for meaningful numbers)' if quick else ''}", "",
             f"{time.strftime('%Y-%m-%d %H:%M')}, pygen {pygen.__version__}, torch {torch.__version__}, "
             f"python {platform.python_version()}, {torch.get_num_threads()} torch thread(s); training "
             f"{sum(r['train_seconds'] for r in done.values()):.0f} s in all (this run: {total:.0f} s, finished "
             "runs and sampling jobs are reused).",
             "",
             f"Each model was trained on the {first['n_train'] if first else ''} training examples of "
             f"{first.get('data', 'digits') if first else ''} "
             f"({'x'.join(map(str, first['shape'])) if first else ''}) with `pygen train`'s default configuration"
             + (" (fewer steps)" if quick else "") + ", sampled with `pygen sample` (seed 0) and scored with "
             "`pygen eval` (`pygen.metrics.evaluate`) against the train split in its feature space, beside the "
             "held-out data (the floor: what a perfect model gets at this size) and a "
             "Gaussian fitted to the training pixels (the bar every model must beat). Lower FD / KID is better; "
             "higher precision / recall / coverage is better.", ""]
    cols = [("fd", "FD"), ("kid", "KID"), ("precision", "precision"), ("recall", "recall"), ("density", "density"),
            ("coverage", "coverage"), ("nll_bpd", "test bits/dim")]
    lines.append("| model | " + " | ".join(c for _, c in cols) + " | beats the bar (FD) | train s | steps |")
    lines.append("|---|" + "---:|" * len(cols) + "---|---:|---:|")

    def cells(r: dict[str, Any]) -> str:
        return " | ".join(f"{r[k]:.3g}" if isinstance(r.get(k), (int, float)) else "" for k, _ in cols)

    for name, r in done.items():
        ev = r["evaluate"]
        beats = "yes" if ev["fd"] < ev["baseline_gaussian"]["fd"] else "**no**"
        lines.append(f"| {name} | {cells(ev)} | {beats} | {r['train_seconds']:.0f} | {r['steps']} |")
    if first is not None:
        lines.append(f"| held-out data (floor) | {cells(first['evaluate']['baseline_data'])} | | | |")
        lines.append(f"| fitted Gaussian (bar) | {cells(first['evaluate']['baseline_gaussian'])} | | | |")
    lines.append("")
    for name, r in done.items():
        lines += [f"## {name}", "",
                  f"{r['parameters']:,} parameters, {r['steps']} steps of {r['batch_size']} in {r['train_seconds']:.0f} s; "
                  f"{r['samples']} samples in {r['sample_seconds']:.1f} s "
                  f"({r['samples'] / max(r['sample_seconds'], 1e-9):,.0f}/s incl. start-up); config `{json.dumps(r['config'])}`",
                  "",
                  f"| samples (first 64, `samples/{name}/grid.png`) | training log (`runs/{name}/metrics.jsonl`) |",
                  "|---|---|",
                  f"| ![{name} samples](samples/{name}/grid.png) | ![{name} curves](curves/{name}.png) |", "",
                  "<details><summary>every indicator</summary>", "", r["table"], "", "</details>", ""]
    lines += ["## Reproduce", "", "```",
              *(f"pygen train {r.get('family', n)} --data {r.get('data', 'digits')} --out runs/{n}"
                + (f" --steps {r['steps']}" if r.get("default_steps") != r["steps"] else "") for n, r in done.items()),
              *(f"pygen sample runs/{n} -n {r['samples']} --out samples/{n}" + ("" if r["ema"] else " --no-ema")
                for n, r in done.items()),
              *(f"pygen eval runs/{n} --data {r.get('data', 'digits')}" + ("" if r["ema"] else " --no-ema")
                for n, r in done.items()), "```", ""]
    report = out / "report.md"
    write_text_atomic(report, "\n".join(lines))
    slim = {k: {kk: vv for kk, vv in v.items() if kk != "table"} for k, v in results.items()}
    write_text_atomic(out / "report.json", json.dumps({"quick": quick, "total_seconds": total, "results": slim},
                                                      indent=1, default=float) + "\n")
    return report


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


def kernels(argv: list[str] | None = None) -> None:
    """The fused-kernel throughput demo (``pygen demo --kernels``)."""
    p = argparse.ArgumentParser(prog="pygen demo --kernels", description="fused-kernel throughput: VAE sampling, DDIM loop")
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
