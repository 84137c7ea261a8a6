"""How many steps latent diffusion's autoencoder needs on Fashion-MNIST: the FD of its test
reconstructions (decoded posterior means of 2000 test images, in the FashionFeatures space,
against the 60,000 training images, as `pygen eval` scores samples) after each number of
steps. A latent diffusion model's samples can be no closer to the data than its
autoencoder's reconstructions, so this FD is a floor for the latent model's.

    python benchmarks/quality/latent_autoencoder.py [--steps 400,800,1600,2400,3200] [--threads 2]

Trains `LatentDiffusion.for_data(fashion-mnist)`'s autoencoder alone (batches of 128, its
Adam at ae_lr, seed 0) and writes benchmarks/results/latent-autoencoder-<cpu>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
from _machine import cpu_name  # noqa: E402


def main() -> None:
    from pygen.data import load
    from pygen.metrics import FashionFeatures
    from pygen.metrics.sample_quality import feature_moments, frechet_distance_from_moments
    from pygen.models import LatentDiffusion
    from pygen.models.autoencoder import l1_per_example

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", default="400,800,1600,2400,3200", help="steps at which to score (comma-separated)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    marks = sorted(int(s) for s in a.steps.split(","))
    train, test = load("fashion-mnist"), load("fashion-mnist:test")
    x_train, x_test = train.data, test.data[:2000]
    net = FashionFeatures.pretrained()
    ref = feature_moments(net.features(x_train))

    def fd(x: torch.Tensor) -> float:
        return frechet_distance_from_moments(*ref, *feature_moments(net.features(x)))

    torch.manual_seed(0)
    model = LatentDiffusion.for_data(train)
    ae, opt = model.autoencoder, model.configure_optimizers()[0]
    g = torch.Generator().manual_seed(0)
    rows, spent = [], 0.0
    for step in range(1, marks[-1] + 1):
        x = x_train[torch.randint(0, len(x_train), (a.batch_size,), generator=g)]
        t0 = time.perf_counter()
        rec, kl = ae(x)
        loss = (l1_per_example(rec, x) + model.kl_weight * kl).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        spent += time.perf_counter() - t0
        if step in marks:
            with torch.no_grad():
                r = ae.decode(ae.encode(x_test, sample=False)[0]).clamp(0, 1)
            rows.append({"steps": step, "test_l1_per_pixel": round(float((r - x_test).abs().mean()), 5),
                         "reconstruction_fd": round(fd(r), 4), "ms_per_step": round(1000 * spent / step, 1)})
            print(json.dumps(rows[-1]), flush=True)
    cpu = cpu_name()
    slug = "amd-epyc" if "AMD" in cpu else ("intel-xeon" if "Xeon" in cpu else "cpu")
    dest = REPO / "benchmarks" / "results" / f"latent-autoencoder-{slug}-{a.threads}threads-{time.strftime('%Y%m%d')}.json"
    dest.write_text(json.dumps({"cpu": cpu, "threads": a.threads, "date": time.strftime("%Y-%m-%d"),
                                "torch": torch.__version__, "batch_size": a.batch_size,
                                "autoencoder_parameters": sum(p.numel() for p in ae.parameters()),
                                "data_floor_fd": "see fashion-mnist-*.json (0.317: 2000 test images)",
                                "rows": rows}, indent=1) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
