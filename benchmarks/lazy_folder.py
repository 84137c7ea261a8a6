"""What reading an image folder lazily costs: the same folder decoded into memory (uint8,
the default when it fits in a quarter of the memory) against decoded per batch (`lazy=True`,
the next batch decoded in a background thread while the step trains).

    python benchmarks/lazy_folder.py [--folder DIR] [--threads 2]

Without --folder, writes Fashion-MNIST's 60,000 training images as PNGs, one sub-folder per
class, to a temporary folder first (`make data`). Reports the folder's load time both ways,
the decode time of one batch of 128 files, and per-step training time of the VAE and the GAN
(their `for_data` defaults; the VAE's post-hoc stages off) decoded, lazy (the next batches
decoded by `default_workers()` worker processes) and lazy with the batches decoded ahead in
one thread of the training process instead, in one process, the runs interleaved (best of 2; each the fit of 10 + N steps minus the fit of 10, so start-up
cancels). Run it with nothing else on the machine. Writes
benchmarks/results/lazy-folder-<cpu>-<threads>threads-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _machine import cpu_name  # noqa: E402


def export_fashion_mnist(root: Path) -> None:
    from PIL import Image

    from pygen.data import load

    d = load("fashion-mnist", "train")
    x = (d.data * 255).round().numpy().astype("uint8")
    y = d.labels.numpy()
    names = [c.replace("/", "-") for c in d.classes]
    for c in names:
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(len(x)):
        Image.fromarray(x[i, 0]).save(root / names[y[i]] / f"{i:05d}.png")


def per_step_ms(cls, data, steps: int) -> float:
    """Milliseconds per training step of ``cls.for_data(data)``: fit(10 + steps) - fit(10)."""
    from pygen.train import fit

    opts = {"post_hoc": False} if cls.__name__ == "VAE" else {}
    bs = cls.train_defaults_for(data)["batch_size"]
    times = []
    for n in (10, 10 + steps):
        torch.manual_seed(0)
        model = cls.for_data(data, **opts)
        t = time.perf_counter()
        fit(model, data, steps=n, batch_size=bs, progress=False)
        times.append(time.perf_counter() - t)
    return 1000 * (times[1] - times[0]) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", type=Path, help="a folder of images (default: Fashion-MNIST exported to PNGs)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from pygen.data import load
    from pygen.data.storage import ImageFiles
    from pygen.models import GAN, VAE

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            folder = Path(tmp) / "fashion-mnist"
            t = time.perf_counter()
            export_fashion_mnist(folder)
            print(f"exported Fashion-MNIST to PNGs in {time.perf_counter() - t:.0f} s", flush=True)
        t = time.perf_counter()
        lazy = load(folder, "all", lazy=True)
        t_lazy = time.perf_counter() - t
        t = time.perf_counter()
        decoded = load(folder, "all", lazy=False)
        t_decoded = time.perf_counter() - t
        assert isinstance(lazy.source, ImageFiles) and not isinstance(decoded.source, ImageFiles)

        g = torch.Generator().manual_seed(0)
        dec = []
        for _ in range(20):
            idx = torch.randint(0, len(lazy), (128,), generator=g)
            t = time.perf_counter()
            lazy.source[idx]
            dec.append(time.perf_counter() - t)
        res = {
            "command": "python benchmarks/lazy_folder.py" + (f" --folder {folder}" if args.folder else ""),
            "date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "threads": args.threads,
            "torch": torch.__version__, "images": len(lazy), "shape": list(lazy.shape),
            "folder_load_s": {"lazy": round(t_lazy, 2), "decoded": round(t_decoded, 2)},
            "decode_batch128_ms_median": round(1000 * sorted(dec)[len(dec) // 2], 1),
        }
        import pygen.train.loop as loop

        workers = loop.default_workers()
        res["workers"] = workers
        modes = {"decoded": (decoded, workers), "lazy": (lazy, workers), "lazy, one thread": (lazy, 0)}
        for name, cls, steps in (("vae", VAE, 600), ("gan", GAN, 60)):
            per: dict[str, list[float]] = {k: [] for k in modes}
            for _ in range(2):
                for kind, (d, w) in modes.items():
                    loop.default_workers = lambda w=w: w  # 0: decoded ahead in one thread of this process
                    per[kind].append(per_step_ms(cls, d, steps))
            loop.default_workers = lambda: workers
            res[name] = {k: round(min(v), 1) for k, v in per.items()} | {
                "unit": "ms per step", "batch": cls.train_defaults_for(decoded)["batch_size"], "steps": steps}
            print(name, res[name], flush=True)
    tag = cpu_name().lower().replace("(r)", "").split()
    out = REPO / "benchmarks" / "results" / (
        f"lazy-folder-{'-'.join(tag[:2])}-{args.threads}threads-{time.strftime('%Y%m%d')}.json")
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
