#!/usr/bin/env python
"""VAEs on scikit-learn's 8x8 digits: the four classic problems measured, with and without their remedies.

    python benchmarks/quality/vae_digits.py                      # ~3-6 min on a shared 2-core CPU
    python benchmarks/quality/vae_digits.py --steps 200 --quick  # smoke run (numbers meaningless)

Trains VAEs with :func:`pygen.train.fit` on the fixed train split of :func:`pygen.data.digits`
(1442 images; MLP encoder/decoder, 16 latents, 2000 steps of batch 128):

- ``bernoulli``: Bernoulli likelihood (logits), beta = 1, no remedy;
- ``bernoulli+wu+fb``: the same with a linear KL warm-up (500 steps) and free bits (0.25 nats
  per dimension) (problems 1, 2);
- ``gaussian-fixed``: Gaussian likelihood with gamma = 1 (the balance problem: the KL wins);
- ``gaussian-learned``: gamma a learned scalar (Dai & Wipf);
- ``gaussian-running``: gamma^2 the running MSE (Asperti & Trentin) (problem 1);
- ``gaussian-running+wu+fb``: the same with warm-up and free bits;
- ``cvae-gaussian-running``: conditional on the label (samples: labels drawn uniformly).

For each: samples from the prior and from a second stage fitted on Q(z) (a 10-component
Gaussian mixture; also a small NSF flow for the Gaussian model) (problem 3), with and without
variance renormalisation (problem 4). Sample metrics (FD, KID, precision, recall) in the
DigitsFeatures space against the train split with 355 samples (the test split's size: the same
protocol as :func:`pygen.metrics.evaluate`, which supplies the held-out-data floor and the
fitted-Gaussian bar), -ELBO and the IWAE NLL bound (k = 100) on the test split in nats per image, active units,
the aggregate-posterior mismatch and the variance loss. Writes
``benchmarks/results/vae-digits-<date>.json``, prints a Markdown table and saves sample grids
(``docs/vae-samples.png``, ``docs/vae-samples-second-stage.png``, ``docs/vae-reconstructions.png``:
test images and their reconstructions side by side) of ``gaussian-running``, and
``docs/vae-samples-conditional.png`` (the conditional model, one class per row).

Likelihood units: the Bernoulli VAEs' ELBO / IWAE treat the grey levels x = k / 16 as Bernoulli
targets (the usual practice; not a density of the data), the Gaussian VAE's are a density of
continuous x; the two are not comparable. ``evaluate``'s "nll" column (Gaussian model only)
dequantises the test images (17 levels) exactly as for its fitted-Gaussian baseline, so those
two are comparable.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import pygen
import pygen.data
from pygen.images import save_grid
from pygen.metrics import DigitsFeatures, density_coverage, evaluate, frechet_distance, kid, precision_recall
from pygen.metrics.vae import (
    active_units,
    aggregate_posterior_mismatch,
    aggregate_posterior_samples,
    elbo_terms,
    kl_per_dim,
    variance_loss,
)
from pygen.models.vae import VAE
from pygen.train import fit

ROOT = Path(__file__).resolve().parents[2]

VARIANTS = {
    "bernoulli": {"likelihood": "bernoulli"},
    "bernoulli+wu+fb": {"likelihood": "bernoulli", "kl_warmup_steps": 500, "free_bits": 0.25},
    "gaussian-fixed": {"likelihood": "gaussian", "gamma": "fixed", "gamma_init": 1.0},
    "gaussian-learned": {"likelihood": "gaussian", "gamma": "learned"},
    "gaussian-running": {"likelihood": "gaussian", "gamma": "running"},
    "gaussian-running+wu+fb": {"likelihood": "gaussian", "gamma": "running", "kl_warmup_steps": 500, "free_bits": 0.25},
    "cvae-gaussian-running": {"likelihood": "gaussian", "gamma": "running", "num_classes": 10},
}
MAIN = "gaussian-running"  # the model of the sample grids


class Scorer:
    """evaluate()'s sample metrics with the reference features computed once."""

    def __init__(self, reference: torch.Tensor, seed: int) -> None:
        self.net = DigitsFeatures.pretrained()
        self.ref = self.net.features(reference)
        self.seed = seed

    def __call__(self, x: torch.Tensor) -> dict[str, float]:
        f = self.net.features(x)
        out = {"fd": frechet_distance(self.ref, f)}
        out["kid"], out["kid_std"] = kid(self.ref, f, subsets=100, subset_size=1000, seed=self.seed)
        out["precision"], out["recall"] = precision_recall(self.ref, f, k=3)
        out["density"], out["coverage"] = density_coverage(self.ref, f, k=5)
        return out


def sample(model: VAE, n: int, seed: int, **kw) -> torch.Tensor:
    return torch.cat([model.sample(min(500, n - i), seed=seed, offset=i, **kw) for i in range(0, n, 500)])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps per model (default 2000)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--iwae-k", type=int, default=100)
    parser.add_argument("--flow-steps", type=int, default=3000, help="steps of the NSF second stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine 2 threads ran 5x slower)")
    parser.add_argument("--quick", action="store_true", help="smoke run: no files written unless --out")
    parser.add_argument("--out", help="results JSON (default benchmarks/results/vae-digits-<date>.json)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency: its BLAS threads too

    threadpool_limits(args.threads)
    t_start = time.perf_counter()

    data = pygen.data.load("digits")
    train, test = pygen.data.train_test(data, seed=args.seed)
    n = len(test)  # 355 samples, as evaluate()
    scorer = Scorer(train.data, args.seed)

    # the floor and the bar, from evaluate() (and the Gaussian model's dequantised NLL below)
    base = evaluate(None, data, seed=args.seed)
    results: dict = {"baseline_data": base["baseline_data"], "baseline_gaussian": base["baseline_gaussian"]}
    rows: list[dict] = []
    models: dict[str, VAE] = {}

    for name in args.variants:
        torch.manual_seed(args.seed)
        model = VAE(data.shape, args.latent, network="mlp", hidden=args.hidden, **VARIANTS[name])
        t0 = time.perf_counter()
        hist = fit(model, train, steps=args.steps, batch_size=args.batch, lr=args.lr, seed=args.seed,
                   progress=False, log_every=max(1, args.steps // 10))  # fmt: skip
        train_s = time.perf_counter() - t0
        model.eval()
        models[name] = model
        g = torch.Generator().manual_seed(args.seed)
        labels = test.labels if model.num_classes else None
        parts = range(0, len(test), 500)
        lab = [labels[i : i + 500] if labels is not None else None for i in parts]
        with torch.no_grad():
            elbo = float(torch.cat([model.elbo(test.data[i : i + 500], lab[j], generator=g)
                                    for j, i in enumerate(parts)]).mean())  # fmt: skip
            iwae = float(torch.cat([
                model.log_likelihood(test.data[i : i + 500], k=args.iwae_k, labels=lab[j], generator=g)
                for j, i in enumerate(parts)
            ]).mean())  # fmt: skip
        terms = elbo_terms(model, test, seed=args.seed)
        kl_u = kl_per_dim(model, train)
        info = {
            "config": model.config,
            "train_seconds": train_s,
            "history": hist,
            "test_elbo": elbo,
            "test_iwae": iwae,
            "test_recon": terms["recon"],
            "test_kl": terms["kl"],
            "test_mse": terms["mse"],
            "active_units": active_units(model, train),
            "kl_per_dim": [float(v) for v in kl_u],
            "mismatch": aggregate_posterior_mismatch(model, train, seed=args.seed),
        }
        if model.likelihood == "gaussian":
            info["gamma"] = float(model.gamma().detach())
        recon = model.reconstruct(test.data, labels)
        info["variance_loss_recon"] = variance_loss(test.data, recon)
        # samplers: the prior, the second stages, and Q(z) itself (decodes of z ~ Q(z|x), n train images)
        stages = ["gmm"] + (["flow"] if name == MAIN else [])
        fitted: dict[str, float] = {}
        info["sets"] = {}
        for stage in [None, *stages]:
            if stage is not None:
                t1 = time.perf_counter()
                kw = {"components": 10} if stage == "gmm" else {"steps": args.flow_steps, "hidden": 128, "n_layers": 4}
                model.fit_second_stage(train, stage, seed=args.seed, **kw)
                fitted[stage] = time.perf_counter() - t1
            label = stage or "prior"
            for renorm in (False, True):
                if renorm:
                    model.calibrate_variance(train, n=n, seed=args.seed + 7, second_stage=stage is not None)
                x = sample(model, n, args.seed, second_stage=stage is not None, renormalize=renorm)
                key = label + ("+renorm" if renorm else "")
                s = scorer(x)
                s["variance_loss"] = variance_loss(test.data, x)
                if renorm:
                    s["var_scale"] = float(model.var_scale)
                info["sets"][key] = s
                row = {"model": name, "sampler": key, **s}
                rows.append(row)
        qz = aggregate_posterior_samples(model, (train.data[:n], train.labels[:n]), seed=args.seed)
        info["sets"]["Q(z) decodes"] = {**scorer(qz), "variance_loss": variance_loss(test.data, qz)}
        rows.append({"model": name, "sampler": "Q(z) decodes", **info["sets"]["Q(z) decodes"]})
        info["second_stage_fit_seconds"] = fitted
        results[name] = info
        print(f"{name}: trained {train_s:.0f} s; ELBO {elbo:.2f}, IWAE {iwae:.2f} nats; "
              f"AU {info['active_units']}/{args.latent}; FD prior {info['sets']['prior']['fd']:.3f}, "
              f"gmm {info['sets']['gmm']['fd']:.3f}", flush=True)  # fmt: skip

        if model.num_classes and not args.quick:  # one row per class, labels 0..9
            rows_lab = torch.arange(10).repeat_interleave(10)
            save_grid(model.sample(100, seed=args.seed, labels=rows_lab), ROOT / "docs" / "vae-samples-conditional.png",
                      10, scale=4)  # fmt: skip
        if name == MAIN and not args.quick:
            docs = ROOT / "docs"
            model.fit_second_stage(train, "gmm", components=10, seed=args.seed)  # the grid's second stage
            save_grid(model.sample(64, seed=args.seed, second_stage=False), docs / "vae-samples.png", 8, scale=4)
            save_grid(model.sample(64, seed=args.seed), docs / "vae-samples-second-stage.png", 8, scale=4)
            pairs = torch.stack([test.data[:32], model.reconstruct(test.data[:32])], 1)  # original, reconstruction
            save_grid(pairs.reshape(64, *data.shape), docs / "vae-reconstructions.png", 8, scale=4)
            # the Gaussian model's NLL on dequantised test images, beside the fitted Gaussian's
            ev = evaluate(model, data, seed=args.seed, iwae_k=args.iwae_k)
            results["evaluate_" + name] = {k: v for k, v in ev.items()}

    # ---- report ----------------------------------------------------------------------
    bg, bd = results["baseline_gaussian"], results["baseline_data"]
    best_fd = min(r["fd"] for r in rows)
    check = {"best_vae_fd": best_fd, "gaussian_fd": bg["fd"], "beats_gaussian": best_fd < bg["fd"]}
    results["check"] = check
    cols = ["fd", "kid", "precision", "recall", "variance_loss"]
    lines = ["| model | sampler | FD | KID | precision | recall | variance loss |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['sampler']} | " + " | ".join(f"{r[c]:.4g}" for c in cols) + " |")
    for label, b in (("held-out data (floor)", bd), ("fitted Gaussian (bar)", bg)):
        lines.append(f"| {label} | | {b['fd']:.4g} | {b['kid']:.4g} | {b['precision']:.4g} | {b['recall']:.4g} | |")
    lines += ["", "| model | test -ELBO | test IWAE NLL (k=%d) | recon | KL | active units | Q(z) FD to N(0,I) | "
              "Q(z) Gaussian KL | variance loss (recon) | train s |" % args.iwae_k,
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name in args.variants:
        i = results[name]
        lines.append(
            f"| {name} | {-i['test_elbo']:.2f} | {-i['test_iwae']:.2f} | {i['test_recon']:.2f} | {i['test_kl']:.2f} | "
            f"{i['active_units']}/{args.latent} | {i['mismatch']['fd']:.3g} | {i['mismatch']['kl_gaussian']:.3g} | "
            f"{i['variance_loss_recon']:.4g} | {i['train_seconds']:.0f} |"
        )
    ev = results.get("evaluate_" + MAIN)
    if ev is not None and "nll" in ev:
        bgn = ev["baseline_gaussian"]
        results["baseline_gaussian"] = bg = {**bg, **{k: bgn[k] for k in ("nll", "nll_se", "nll_bpd")}}
        lines += ["", f"Dequantised test NLL (evaluate, IWAE k={args.iwae_k}): {MAIN} {ev['nll']:.2f} ± "
                  f"{ev['nll_se']:.2f} nats ({ev['nll_bpd']:.3f} bits/dim); fitted Gaussian "
                  f"{bg['nll']:.2f} ± {bg['nll_se']:.2f} ({bg['nll_bpd']:.3f} bits/dim)."]  # fmt: skip
    lines += ["", f"FD check: best VAE {best_fd:.3f} vs fitted Gaussian {bg['fd']:.3f}: "
              + ("beats the bar" if check["beats_gaussian"] else "DOES NOT beat the bar")]  # fmt: skip
    table = "\n".join(lines)
    print(table)

    import sklearn

    results["table"] = table
    results["rows"] = rows
    results["args"] = vars(args)
    results["command"] = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    results["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                           "pygen": str(pygen.__version__), "sklearn": sklearn.__version__}  # fmt: skip
    results["device"] = f"cpu, {args.threads} threads"
    results["total_seconds"] = time.perf_counter() - t_start
    default_out = ROOT / "benchmarks" / "results" / f"vae-digits-{time.strftime('%Y%m%d')}.json"
    out = args.out or (None if args.quick else default_out)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=1, default=float) + "\n")
        print(f"wrote {out} ({results['total_seconds']:.0f} s in all)")
    return results


if __name__ == "__main__":
    main()
