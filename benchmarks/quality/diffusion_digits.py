#!/usr/bin/env python
"""Train pygen's diffusion models and write the results table (not a test).

    python benchmarks/quality/diffusion_digits.py                 # everything (base ~10 min, the rest ~15 min, 2 cores)
    python benchmarks/quality/diffusion_digits.py --only base     # the base model and its samplers / guidance / inpainting
    python benchmarks/quality/diffusion_digits.py --steps 200 --sr-steps 100 --no-save   # smoke run

Stages (``--only`` picks some):

- ``base``: a class-conditional :class:`pygen.models.Diffusion` (EDM preconditioning, label
  dropout 0.1) on the 1442 training digits (8x8), trained with :func:`pygen.train.fit`; its
  EMA weights scored by :func:`pygen.metrics.evaluate` (FD / KID / precision / recall in
  DigitsFeatures space, 355 samples vs the train split, beside the held-out digits (floor)
  and a fitted Gaussian (bar)) for DDPM-1000, DDIM-50 and DPM-Solver++-20 samples; class
  accuracy of guided samples under the digits classifier at guidance 0, 1, 2, 4;
  inpainting (RePaint) of held-out digits with the lower half hidden: known-pixel error and
  the diversity of 8 completions vs the spread of real digits of the same class there.
- ``sr-digits``: a :class:`SuperResolution` stage 8 -> 16 on the digits (16x16 targets); PSNR /
  SSIM vs bicubic on the test digits.
- ``cascade``: 16x16 digits from the base model then the SR stage (:class:`Cascade`) vs the base
  model then bicubic, FD etc. at 16x16 (with ``--models``, from the stages' saved models).
- ``sr-patches``: x4 super-resolution of 16x16 photo patches (4x4 inputs) from scikit-learn's
  sample images (:func:`pygen.data.patches`, train / test regions disjoint); PSNR / SSIM vs
  bicubic on the test patches (one sample, and the mean of 4).
- ``colorize``: a :class:`Colorization` model on the same 16x16 patches, next to a regression
  baseline (the same UNet trained with MSE from the luminance): luminance error, colour
  diversity among 4 colourings, colourfulness (mean chroma) vs the real patches, PSNR.

Writes ``benchmarks/results/diffusion-digits-<date>.json`` and PNG grids under ``docs/``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import pygen
import pygen.data
from pygen.images import save_grid
from pygen.metrics import DigitsFeatures, evaluate, pairwise_diversity, psnr, ssim
from pygen.models import Cascade, Colorization, Diffusion, SuperResolution
from pygen.models.conditioned import luminance
from pygen.models.unet import UNet
from pygen.train import fit

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
COLUMNS = ("fd", "kid", "precision", "recall")
STAGES = ("base", "sr-digits", "sr-patches", "colorize", "cascade")


class _Sampler:
    """A model behind evaluate()'s sample(n, *, seed, offset) with fixed sampler settings."""

    def __init__(self, model, **kw) -> None:
        self.model, self.kw = model, kw

    def sample(self, n: int, *, seed: int | None = None, offset: int = 0) -> torch.Tensor:
        return self.model.sample(n, seed=seed, offset=offset, **self.kw)


def row(name: str, m: dict, extra: str = "") -> str:
    return f"| {name} | " + " | ".join(f"{m[k]:.4g}" for k in COLUMNS) + f" |{extra}"


def stage_base(args, out: dict) -> Diffusion:
    train = pygen.data.load("digits", "train")
    torch.manual_seed(args.seed)
    model = Diffusion.for_data(train)
    out["runs"]["base"] = _train_with_ema(model, train, args.steps, args.batch, args, "base")
    model = out["runs"]["base"].pop("_model")
    model.eval()
    results, seconds = {}, {}
    samplers = [("DPM-Solver++ 2M, 20 steps", "dpmpp_2m", 20), ("DDIM, 50 steps", "ddim", 50),
                ("DDPM, 1000 steps", "ddpm", args.ddpm_steps)]
    for name, sampler, steps in samplers:
        t0 = time.perf_counter()
        results[name] = evaluate(_Sampler(model, sampler=sampler, steps=steps, batch_size=512), "digits",
                                 seed=args.eval_seed, kid_subsets=args.kid_subsets)
        seconds[name] = time.perf_counter() - t0
        print(row(name, results[name]) + f" ({seconds[name]:.0f} s)", flush=True)
    first = next(iter(results.values()))
    floor, bar = first["baseline_data"], first["baseline_gaussian"]
    lines = ["| samples (EMA weights, labels uniform, guidance 1) | FD | KID | precision | recall | sampling s |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [row(k, v, f" {seconds[k]:.0f} |") for k, v in results.items()]
    lines += [row("fitted Gaussian (bar)", bar, " |"), row("held-out digits (floor)", floor, " |")]
    out["tables"]["base"] = "\n".join(lines)
    out["results"]["samplers"] = {k: {m: v for m, v in r.items() if not isinstance(v, dict)}
                                  for k, r in results.items()}
    out["results"]["baseline_gaussian"], out["results"]["baseline_data"] = bar, floor
    out["results"]["sampling_seconds"] = seconds

    # class accuracy of guided samples under the digits classifier
    clf = DigitsFeatures.pretrained()
    n = 500
    labels = torch.arange(n) % 10
    acc = {}
    for s in (0.0, 1.0, 2.0, 4.0):
        x = model.sample(n, seed=args.eval_seed, labels=labels, guidance_scale=s)
        acc[s] = float((clf.predict(x) == labels).float().mean())
        if s == 2.0:
            grid = model.sample(80, seed=1, labels=torch.arange(80) % 10, guidance_scale=s)
        print(f"guidance {s}: class accuracy {acc[s]:.3f}", flush=True)
    real_test = pygen.data.load("digits", "test")
    acc_real = float((clf.predict(real_test.data) == real_test.labels).float().mean())
    out["results"]["guidance_accuracy"] = {str(k): v for k, v in acc.items()} | {"real test digits": acc_real}
    out["tables"]["guidance"] = "\n".join(
        ["| guidance scale s | 0 (unconditional) | 1 | 2 | 4 | real test digits |", "|---|---:|---:|---:|---:|---:|",
         "| class accuracy (DPM-Solver++ 20) | " + " | ".join(f"{acc[s]:.3f}" for s in (0.0, 1.0, 2.0, 4.0))
         + f" | {acc_real:.3f} |"])
    if not args.no_save:
        # rows: the ten classes; columns: eight samples each (guidance 2)
        save_grid(grid.view(8, 10, 1, 8, 8).transpose(0, 1).reshape(80, 1, 8, 8), DOCS / "diffusion-samples.png",
                  nrow=8, scale=4)

    # inpainting: lower half hidden
    x = real_test.data[: args.inpaint_n]
    y = real_test.labels[: args.inpaint_n]
    mask = torch.ones(1, 1, 8, 8)
    mask[..., 4:, :] = 0
    t0 = time.perf_counter()
    comp = model.inpaint(x, mask, n=8, seed=0, labels=y)
    sec = time.perf_counter() - t0
    known_err = float((comp - x[:, None]).abs().mul(mask).max())
    div = pairwise_diversity(comp, 1 - mask)
    # the data's own spread in the hidden half: pairs of real test digits of the same class
    same = [pairwise_diversity(real_test.data[real_test.labels == c][None, :40], 1 - mask) for c in range(10)]
    any_pair = pairwise_diversity(real_test.data[None, :80], 1 - mask)
    truth = float(((comp - x[:, None]) ** 2 * (1 - mask)).flatten(2).sum(2).div((1 - mask).sum()).sqrt().mean())
    comp_acc = float((clf.predict(comp.flatten(0, 1)) == y.repeat_interleave(8)).float().mean())
    out["results"]["inpainting"] = {"known_pixel_max_abs_error": known_err, "diversity_rms": div,
                                    "real_same_class_rms": sum(same) / len(same), "real_any_rms": any_pair,
                                    "rms_to_truth": truth, "completion_class_accuracy": comp_acc, "seconds": sec,
                                    "images": int(x.shape[0]), "completions": 8}
    out["tables"]["inpainting"] = "\n".join([
        "| inpainting (lower half hidden, 8 completions each) | value |", "|---|---:|",
        f"| known pixels: max abs error | {known_err:.2g} |",
        f"| diversity: RMS distance between completions (hidden half) | {div:.3f} |",
        f"| real digits, same class: RMS distance (hidden half) | {sum(same) / len(same):.3f} |",
        f"| real digits, any class: RMS distance (hidden half) | {any_pair:.3f} |",
        f"| RMS distance of a completion to the true digit | {truth:.3f} |",
        f"| completions classified as the true label | {comp_acc:.3f} |"])
    print(out["tables"]["inpainting"], flush=True)
    if not args.no_save:
        k = min(8, x.shape[0])
        masked = x[:k] * mask + 0.5 * (1 - mask)
        rows = torch.cat([x[:k, None], masked[:, None], comp[:k, :6]], 1)  # truth, input, 6 completions
        save_grid(rows.flatten(0, 1), DOCS / "diffusion-inpainting.png", nrow=8, scale=4)
    return model


def _train_with_ema(model, data, steps, batch, args, label) -> dict:
    """fit() into a temporary run directory, then load the EMA weights back."""
    import tempfile

    from pygen.models import load

    with tempfile.TemporaryDirectory() as d:
        print(f"[{label}] {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {steps} steps of "
              f"batch {batch}", flush=True)
        t0 = time.perf_counter()
        hist = fit(model, data, steps=steps, batch_size=batch, lr=args.lr, seed=args.seed, progress=args.progress,
                   log_every=max(1, steps // 10), eval_every=steps, checkpoint_every=steps, out=d)
        sec = time.perf_counter() - t0
        for r in hist:
            if "loss" in r:
                print(f"[{label}] step {r['step']:6d}  loss {r['loss']:.4f}  {r.get('steps_per_s', 0):.1f} steps/s",
                      flush=True)
        print(f"[{label}] trained in {sec:.0f} s", flush=True)
        ema = load(d, ema=True)
    return {"config": model.config, "train_seconds": sec, "history": hist, "_model": ema}


def _restoration_rows(name: str, x: torch.Tensor, hr: torch.Tensor) -> str:
    return f"| {name} | {psnr(x, hr):.2f} | {ssim(x, hr):.3f} |"


def stage_sr_digits(args, out: dict) -> SuperResolution:
    hr, _ = pygen.data.digits("train", 16)
    torch.manual_seed(args.seed)
    sr = SuperResolution((1, 16, 16), scale=2)
    out["runs"]["sr-digits"] = _train_with_ema(sr, hr, args.sr_steps, args.sr_batch, args, "sr-digits")
    sr = out["runs"]["sr-digits"].pop("_model").eval()
    test, _ = pygen.data.digits("test", 16)
    low_res = sr.downsample(test)
    pred = sr.sample(low_res=low_res, seed=0)
    bic = sr.upsample(low_res).clamp(0, 1)
    lines = ["| digits 8 -> 16 (355 test digits) | PSNR dB | SSIM |", "|---|---:|---:|",
             _restoration_rows("bicubic", bic, test), _restoration_rows("SR diffusion (DPM-Solver++ 20)", pred, test)]
    res = {"psnr_bicubic": psnr(bic, test), "ssim_bicubic": ssim(bic, test), "psnr_sr": psnr(pred, test),
           "ssim_sr": ssim(pred, test)}
    out["results"]["sr_digits"] = res
    out["tables"]["sr-digits"] = "\n".join(lines)
    print(out["tables"]["sr-digits"], flush=True)
    return sr


def stage_cascade(args, out: dict, base: Diffusion, sr: SuperResolution) -> None:
    """16x16 digits from the 8x8 base model then the SR stage, vs the base + bicubic."""
    # the 16x16 digits are bilinear upsamplings of the 8x8 ones and the SR stage learned to
    # invert their 2x2 block means: give it the block means of the upsampled base sample
    def adapt(low: torch.Tensor) -> torch.Tensor:
        return sr.downsample(F.interpolate(low, scale_factor=2, mode="bilinear", align_corners=False).clamp(0, 1))

    naive = evaluate(_Sampler(Cascade(base, sr)), "digits16", seed=args.eval_seed, kid_subsets=args.kid_subsets)
    cas = Cascade(base, sr, adapt=adapt)
    r = evaluate(_Sampler(cas), "digits16", seed=args.eval_seed, kid_subsets=args.kid_subsets)
    bic = evaluate(_Sampler(_Bicubic(base, 2)), "digits16", seed=args.eval_seed, kid_subsets=args.kid_subsets)
    out["results"]["cascade"] = {"cascade": {k: v for k, v in r.items() if not isinstance(v, dict)},
                                 "cascade_unadapted": {k: v for k, v in naive.items() if not isinstance(v, dict)},
                                 "base_bicubic": {k: v for k, v in bic.items() if not isinstance(v, dict)},
                                 "baseline_gaussian": r["baseline_gaussian"], "baseline_data": r["baseline_data"]}
    out["tables"]["cascade"] = "\n".join([
        "| 16x16 digits, 355 samples | FD | KID | precision | recall |", "|---|---:|---:|---:|---:|",
        row("cascade: base 8x8 + SR stage (base sample mapped to the SR's input space)", r),
        row("cascade, base sample fed as is", naive), row("base 8x8 + bicubic", bic),
        row("fitted Gaussian at 16x16 (bar)", r["baseline_gaussian"]),
        row("held-out digits at 16x16 (floor)", r["baseline_data"])])
    print(out["tables"]["cascade"], flush=True)
    if not args.no_save:
        hi, lo = cas.sample(16, seed=3, return_low=True)
        up = F.interpolate(lo, scale_factor=2, mode="nearest")
        save_grid(torch.cat([up.view(2, 8, 1, 16, 16), hi.view(2, 8, 1, 16, 16)], 1).flatten(0, 1),
                  DOCS / "diffusion-cascade.png", nrow=8, scale=4)


class _Bicubic:
    def __init__(self, base, scale):
        self.base, self.scale = base, scale

    def sample(self, n, *, seed=None, offset=0):
        lo = self.base.sample(n, seed=seed, offset=offset)
        return F.interpolate(lo, scale_factor=self.scale, mode="bicubic", align_corners=False).clamp(0, 1)


def _patches(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    return pygen.data.patches(16, 4, split, stride=8 if split == "train" else 16)


def stage_sr_patches(args, out: dict) -> None:
    hr, _ = _patches("train")
    torch.manual_seed(args.seed)
    sr = SuperResolution((3, 16, 16), scale=4)
    out["runs"]["sr-patches"] = _train_with_ema(sr, hr, args.sr_steps, args.sr_batch, args, "sr-patches")
    sr = out["runs"]["sr-patches"].pop("_model").eval()
    test, low_res = _patches("test")
    bic = sr.upsample(low_res).clamp(0, 1)
    samples = torch.stack([sr.sample(low_res=low_res, seed=s) for s in range(4)], 1)  # (N, 4, 3, 16, 16)
    raw = sr.sample(low_res=low_res, seed=0, consistent=False)  # without the projection onto low_res
    mean = samples.mean(1)
    res = {"n_train": int(hr.shape[0]), "n_test": int(test.shape[0]), "psnr_bicubic": psnr(bic, test),
           "ssim_bicubic": ssim(bic, test), "psnr_sr": psnr(samples[:, 0], test), "ssim_sr": ssim(samples[:, 0], test),
           "psnr_sr_mean4": psnr(mean, test), "ssim_sr_mean4": ssim(mean, test),
           "diversity_rms": pairwise_diversity(samples), "psnr_sr_raw": psnr(raw, test), "ssim_sr_raw": ssim(raw, test)}
    out["results"]["sr_patches"] = res
    out["tables"]["sr-patches"] = "\n".join([
        f"| photo patches x4: 4x4 -> 16x16 ({test.shape[0]} test patches) | PSNR dB | SSIM |", "|---|---:|---:|",
        _restoration_rows("bicubic", bic, test),
        _restoration_rows("SR diffusion, one sample, no projection onto low_res", raw, test),
        _restoration_rows("SR diffusion, one sample", samples[:, 0], test),
        _restoration_rows("SR diffusion, mean of 4 samples", mean, test)])
    print(out["tables"]["sr-patches"], flush=True)
    if not args.no_save:
        k = 8  # the most detailed test patches (flat sky shows nothing)
        idx = test.flatten(1).var(1).argsort(descending=True)[:k]
        near = F.interpolate(low_res[idx], scale_factor=4, mode="nearest")
        save_grid(torch.cat([near, bic[idx], samples[idx, 0], samples[idx, 1], test[idx]]), DOCS / "diffusion-sr.png",
                  nrow=k, scale=4)


class _Regression(torch.nn.Module):
    """The MSE baseline: the same UNet, luminance in, RGB out, one forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.net = UNet(3, width=32, mults=(1, 2, 2), cond_channels=1)

    def forward(self, gray: torch.Tensor) -> torch.Tensor:
        g = 2 * gray - 1
        z = torch.zeros(g.shape[0], 3, *g.shape[2:], device=g.device)
        return (self.net(z, torch.zeros(g.shape[0], device=g.device), cond=g) + 1) / 2


def _chroma(x: torch.Tensor) -> torch.Tensor:
    return x - luminance(x)


def stage_colorize(args, out: dict) -> None:
    hr, _ = _patches("train")
    test, _ = _patches("test")
    torch.manual_seed(args.seed)
    col = Colorization((3, 16, 16))
    out["runs"]["colorize"] = _train_with_ema(col, hr, args.sr_steps, args.sr_batch, args, "colorize")
    col = out["runs"]["colorize"].pop("_model").eval()
    # the regression baseline, trained with MSE for as many steps
    torch.manual_seed(args.seed)
    reg = _Regression()
    opt = torch.optim.Adam(reg.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for _ in range(args.sr_steps):
        idx = torch.randint(0, hr.shape[0], (args.sr_batch,), generator=g)
        x = hr[idx]
        loss = F.mse_loss(reg(luminance(x)), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    reg_sec = time.perf_counter() - t0
    print(f"[regression] trained in {reg_sec:.0f} s, final MSE {loss.item():.4f}", flush=True)
    gray = luminance(test)
    raw = col.colorize(gray, n=4, seed=0, match_luminance=False)
    cols = col.colorize(gray, n=4, seed=0)
    with torch.no_grad():
        base = reg(gray).clamp(0, 1)
    real_chroma = float(_chroma(test).pow(2).mean().sqrt())

    def lum_err(x: torch.Tensor) -> float:
        return float((luminance(x) - gray).abs().mean())

    res = {
        "luminance_mae_raw": float((luminance(raw.flatten(0, 1)) - gray.repeat_interleave(4, 0)).abs().mean()),
        "luminance_mae_matched": float((luminance(cols.flatten(0, 1)) - gray.repeat_interleave(4, 0)).abs().mean()),
        "luminance_mae_regression": lum_err(base),
        "diversity_rms": pairwise_diversity(cols),
        "chroma_rms_diffusion": float(_chroma(cols.flatten(0, 1)).pow(2).mean().sqrt()),
        "chroma_rms_regression": float(_chroma(base).pow(2).mean().sqrt()),
        "chroma_rms_real": real_chroma,
        "psnr_diffusion": psnr(cols[:, 0], test), "psnr_regression": psnr(base, test),
        "regression_train_seconds": reg_sec,
    }
    out["results"]["colorize"] = res
    out["tables"]["colorize"] = "\n".join([
        f"| colorization of {test.shape[0]} test patches (16x16) | luminance MAE | colour diversity (RMS, 4 colourings) "
        "| colourfulness (chroma RMS) | PSNR dB |", "|---|---:|---:|---:|---:|",
        f"| diffusion, luminance matched | {res['luminance_mae_matched']:.2g} | {res['diversity_rms']:.4f} | "
        f"{res['chroma_rms_diffusion']:.4f} | {res['psnr_diffusion']:.2f} |",
        f"| diffusion, raw | {res['luminance_mae_raw']:.3f} | | | |",
        f"| regression (MSE) baseline | {res['luminance_mae_regression']:.3f} | 0 | {res['chroma_rms_regression']:.4f} "
        f"| {res['psnr_regression']:.2f} |",
        f"| real patches | 0 | | {real_chroma:.4f} | |"])
    print(out["tables"]["colorize"], flush=True)
    if not args.no_save:
        k = 8
        idx = _chroma(test).pow(2).flatten(1).mean(1).argsort(descending=True)[::13][:k]  # colourful patches
        save_grid(torch.cat([gray[idx].expand(-1, 3, -1, -1), base[idx], cols[idx, 0], cols[idx, 1], cols[idx, 2],
                             test[idx]]),
                  DOCS / "diffusion-colorization.png", nrow=k, scale=4)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(STAGES), help=f"comma-separated stages of {STAGES}")
    p.add_argument("--steps", type=int, default=Diffusion.train_defaults["steps"], help="base model steps")
    p.add_argument("--sr-steps", type=int, default=SuperResolution.train_defaults["steps"],
                   help="steps of the SR and colorization stages (and of the regression baseline)")
    p.add_argument("--batch", type=int, default=Diffusion.train_defaults["batch_size"])
    p.add_argument("--sr-batch", type=int, default=SuperResolution.train_defaults["batch_size"],
                   help="batch of the SR and colorization stages")
    p.add_argument("--lr", type=float, default=Diffusion.train_defaults["lr"])
    p.add_argument("--ddpm-steps", type=int, default=1000)
    p.add_argument("--inpaint-n", type=int, default=64, help="test digits to inpaint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seed", type=int, default=0)
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--no-save", action="store_true", help="write neither the JSON nor the PNGs")
    p.add_argument("--models", help="save each trained stage's EMA model here (DIR/<stage>.pt); the cascade "
                   "stage loads base.pt and sr-digits.pt from it when those stages are not run")
    p.add_argument("--out", help="JSON path (default benchmarks/results/diffusion-digits-<date>.json)")
    args = p.parse_args(argv)
    stages = [s for s in args.only.split(",") if s]
    if bad := [s for s in stages if s not in STAGES]:
        p.error(f"unknown stage(s) {bad}; choose from {STAGES}")
    torch.set_num_threads(args.threads)
    out: dict = {"benchmark": "diffusion_digits", "runs": {}, "results": {}, "tables": {}}
    t0 = time.perf_counter()
    models = Path(args.models) if args.models else None

    def keep(name: str, model) -> None:
        if models is not None:
            models.mkdir(parents=True, exist_ok=True)
            model.save(models / f"{name}.pt")

    def saved(name: str):
        from pygen.models import load

        path = models / f"{name}.pt" if models is not None else None
        if path is None or not path.exists():
            p.error(f"stage cascade needs --models DIR holding {name}.pt (run that stage with --models first)")
        return load(path).eval()

    base = sr_digits = None
    if "base" in stages:
        keep("base", base := stage_base(args, out))
    if "sr-digits" in stages:
        keep("sr-digits", sr_digits := stage_sr_digits(args, out))
    if "cascade" in stages:
        stage_cascade(args, out, base or saved("base"), sr_digits or saved("sr-digits"))
    if "sr-patches" in stages:
        stage_sr_patches(args, out)
    if "colorize" in stages:
        stage_colorize(args, out)
    out.update({
        "command": " ".join(["python", "benchmarks/quality/diffusion_digits.py", *(sys.argv[1:] if argv is None else argv)]),
        "args": vars(args), "total_seconds": time.perf_counter() - t0,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "pygen": str(pygen.__version__)},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": args.threads},
        "date": time.strftime("%Y-%m-%d"),
    })  # fmt: skip
    print("\n\n".join(out["tables"].values()))
    if not args.no_save:
        default = REPO / "benchmarks" / "results" / f"diffusion-digits-{time.strftime('%Y%m%d')}.json"
        path = Path(args.out) if args.out else default
        if path.exists():  # one file per stage set: merge with earlier stages of the same day
            old = json.loads(path.read_text())
            for k in ("runs", "results", "tables"):
                old[k] = {**old.get(k, {}), **out[k]}
            out = {**old, **{k: v for k, v in out.items() if k not in ("runs", "results", "tables")}}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2, default=float) + "\n")
        print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
