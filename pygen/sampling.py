"""The large-batch sampling job: N samples from a checkpoint into a directory of shards.

>>> from pygen.sampling import sample_to_dir, SampleDir
>>> manifest = sample_to_dir("runs/glow", 1_000_000, "samples/glow", batch_size=1024, seed=0)
>>> x = SampleDir("samples/glow").read(0, 64)          # (64, *shape) float32

Sample i depends only on (checkpoint, seed, sampler settings, i): every model's
``sample(n, seed=s, offset=i0)`` returns samples i0 .. i0 + n - 1 of seed s, whatever the
chunking (up to float rounding of the network at another batch size). So the job is a set of
shards, each a pure function of its index range:

- ``DIR/manifest.json``: the checkpoint (path and sha256), seed, sampler settings, labels,
  data, N, shard size and the shard list with their index ranges; written (atomically) when
  the job starts and rewritten with ``"complete": true`` when every shard is there.
- ``--format npz``: ``DIR/shard-<start>-<stop>.npz`` (``stop`` exclusive, 10 digits each) with
  ``samples`` (n, ...) float32 in the data's range and ``index`` (n,) int64. ``png``:
  ``DIR/<index>.png`` (10 digits), one image per sample (images of 1 or 3 channels only).
- Every file is written to a temp name in DIR, fsynced and renamed: it exists complete or
  not at all. Run again with the same arguments, the job keeps the complete shards and
  redoes the rest; another checkpoint, seed or setting in the same DIR is refused
  (:class:`SamplingError`), so samples of two jobs never mix.
- Under torchrun each rank samples its own share of the missing shards (gloo on CPU, NCCL on
  GPU); rank 0 writes the manifest after a barrier, then ``DIR/grid.png`` (the first 64 samples).

Memory stays bounded by one shard (``shard_size`` samples, default: batch-size multiples up to
about 64 MB of float32) whatever N is.
"""

from __future__ import annotations

import datetime
import hashlib
import inspect
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pygen._io import gigabytes, write_atomic
from pygen._lock import LOCK, DirectoryBusy

__all__ = ["SamplingError", "sample_to_dir", "SampleDir", "plan_shards", "file_sha256", "MANIFEST"]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
#: settings that fix the samples: another value in an existing directory is refused
IDENTITY = ("checkpoint_sha256", "ema", "seed", "n", "shard_size", "format", "sampler", "labels", "data")
_SHARD_BYTES = 64 * 2**20
_MAX_DEFAULT_SHARD = 100_000


class SamplingError(ValueError):
    """A sampling job that cannot run as asked (a user mistake: one line for the command line)."""


# ---- small helpers ---------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def plan_shards(n: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) index ranges of the shards of an n-sample job."""
    return [(a, min(a + shard_size, n)) for a in range(0, n, shard_size)]


def shard_file(start: int, stop: int) -> str:
    return f"shard-{start:010d}-{stop:010d}.npz"


def png_file(index: int) -> str:
    return f"{index:010d}.png"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, obj: Any) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1) + "\n"), "w")


def _to_image_array(x: Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> uint8 (H, W) or (H, W, 3)."""
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return arr[0].numpy() if arr.shape[0] == 1 else arr.permute(1, 2, 0).numpy()


def _write_png(path: Path, x: Tensor) -> None:
    from PIL import Image

    img = Image.fromarray(_to_image_array(x))
    write_atomic(path, lambda f: img.save(f, format="PNG"), "wb")


def _read_png(path: Path, channels: int) -> Tensor:
    from PIL import Image

    with Image.open(path) as img:
        arr = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    t = torch.from_numpy(arr)
    return t[None] if channels == 1 else t.permute(2, 0, 1)


# ---- the labels and conditions of sample i -----------------------------------------------------


def parse_labels(spec: str | int | None) -> str | int | None:
    """None / "random" (the model's own draw: uniform, from a stream derived from the seed),
    "cycle" (label of sample i = i mod classes) or an int (every sample that class)."""
    if spec is None or spec == "random":
        return None
    if spec == "cycle":
        return "cycle"
    try:
        k = int(spec)
    except (TypeError, ValueError):
        raise SamplingError(f"--labels must be 'random', 'cycle' or a class number, got {spec!r}") from None
    if k < 0:
        raise SamplingError(f"--labels must be a class number >= 0, got {k}")
    return k


class _Job:
    """The checkpoint's model and what ``sample`` gets for the samples [i0, i0 + m)."""

    def __init__(self, model: Any, *, seed: int, sampler: dict[str, Any], labels: str | int | None,
                 low_res: Tensor | None, device: torch.device) -> None:  # fmt: skip
        self.model, self.seed, self.low_res, self.device = model, seed, low_res, device
        self.labels = labels
        self.num_classes = (getattr(model, "config", None) or {}).get("num_classes")
        self.params = _parameters(model.sample)
        family = getattr(model, "family", type(model).__name__)
        flags = {"sampler": "--sampler", "steps": "--steps", "guidance_scale": "--guidance"}
        given = {k: v for k, v in sampler.items() if v is not None}
        for key in given:
            if key not in self.params:
                raise SamplingError(f"{flags.get(key, key)} does not apply to a {family!r} model (its sample() "
                                    f"takes {', '.join(sorted(self.params)) or 'no options'})")
        self.sampler = resolve_settings(model, given)
        if labels is not None:
            if not self.num_classes or "labels" not in self.params:
                raise SamplingError(f"--labels needs a class-conditional model; this {family!r} model is not one")
            if isinstance(labels, int) and labels >= self.num_classes:
                raise SamplingError(f"--labels {labels}: the model has classes 0..{self.num_classes - 1}")
        if "low_res" in self.params and low_res is None:
            raise SamplingError(f"a {family!r} model samples from low-resolution inputs: pass --data SPEC "
                                "(sample i gets the test input i mod its size)")

    def __call__(self, i0: int, m: int) -> Tensor:
        kw: dict[str, Any] = dict(self.sampler)
        if isinstance(self.labels, int):
            kw["labels"] = torch.full((m,), self.labels, dtype=torch.long, device=self.device)
        elif self.labels == "cycle":
            kw["labels"] = torch.arange(i0, i0 + m, device=self.device) % self.num_classes
        if "low_res" in self.params and self.low_res is not None:
            idx = torch.arange(i0, i0 + m) % len(self.low_res)
            kw["low_res"] = self.low_res[idx].to(self.device)
        with torch.no_grad():
            x = self.model.sample(m, seed=self.seed, offset=i0, **kw)
        return x.detach().float().cpu()


def resolve_settings(model: Any, given: dict[str, Any]) -> dict[str, Any]:
    """The sampler settings ``model.sample(**given)`` actually uses, defaults filled in
    (:meth:`pygen.models.GenerativeModel.sample_settings`): what the manifest records and
    compares, so that giving a default explicitly is the same job."""
    settings = getattr(model, "sample_settings", None)
    if settings is None:
        return dict(given)
    try:
        return settings(**given)
    except (ValueError, TypeError) as e:
        raise SamplingError(f"the {manifest_family(model)} model cannot sample with these settings: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _parameters(fn: Any) -> set[str]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return set()
    names = {n for n, p in sig.parameters.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        names |= {"sampler", "steps", "guidance_scale", "labels"}  # passed on (a stage's **kwargs)
    return names


# ---- the directory ------------------------------------------------------------------------------


def _is_empty(out: Path) -> bool:
    return not out.exists() or all(p.name.startswith(".tmp-") or p.name == LOCK for p in out.iterdir())


def _check_finite(x: Tensor, start: int, stop: int) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = start + int((~torch.isfinite(x.flatten(1))).any(1).nonzero()[0, 0])
        raise SamplingError(f"samples {start}..{stop - 1} hold NaN or inf (first: sample {bad}): the checkpoint's "
                            "weights or the sampler settings (--guidance, --steps) diverge; nothing of them was written")


def _check_writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SamplingError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SamplingError(f"cannot create the output directory {out}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise SamplingError(f"cannot write to the output directory {out} (permission denied)")


def _check_space(out: Path, n: int, probe: Tensor, fmt: str) -> None:
    """Refuse an ``n`` whose samples cannot fit the free space of ``out`` (float32 in .npz;
    about one byte per value as PNG), counting the shards already there: a job that would fill
    the disk half-way, or an -n typo of 10**12, is one line before anything is written."""
    import shutil

    per = probe.numel() * (4 if fmt == "npz" else 1)
    done = sum(p.stat().st_size for p in out.iterdir() if p.suffix in (".npz", ".png"))
    need, free = n * per - done, shutil.disk_usage(out).free
    if need > free:
        raise SamplingError(f"-n {n} needs about {gigabytes(n * per)} in {out} ({gigabytes(done)} of it written); "
                            f"{gigabytes(free)} are free there: sample fewer, or into a larger disk")  # fmt: skip


def _read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SamplingError(f"{path} is unreadable ({e}); use another --out") from None


def _check_same_job(out: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    diff = [k for k in IDENTITY if old.get(k) != new.get(k)]
    if diff:
        def show(k: str, d: dict[str, Any]) -> str:
            v = d.get(k)
            return f"{v[:12]}..." if k == "checkpoint_sha256" and isinstance(v, str) else json.dumps(v)

        what = ", ".join(f"{k} {show(k, old)} there vs {show(k, new)} now" for k in diff)
        raise SamplingError(f"{out} holds samples of another job ({what}): use another --out, or the same "
                            "checkpoint and settings to resume it")


def _shard_complete(out: Path, start: int, stop: int, fmt: str) -> bool:
    if fmt == "png":
        return all((out / png_file(i)).exists() for i in range(start, stop))
    path = out / shard_file(start, stop)
    if not path.exists():
        return False
    try:
        with np.load(path) as z:
            ok = np.array_equal(z["index"], np.arange(start, stop)) and z["samples"].shape[0] == stop - start
    except Exception:  # a damaged file (disk trouble): redo it
        ok = False
    if not ok:
        path.unlink(missing_ok=True)
    return ok


def _write_shard(out: Path, start: int, x: Tensor, fmt: str) -> None:
    stop = start + x.shape[0]
    if fmt == "png":
        for j in range(x.shape[0]):
            _write_png(out / png_file(start + j), x[j])
        return
    samples, index = x.numpy().astype(np.float32, copy=False), np.arange(start, stop, dtype=np.int64)
    write_atomic(out / shard_file(start, stop), lambda f: np.savez(f, samples=samples, index=index), "wb")


def _default_shard_size(batch_size: int, sample_numel: int) -> int:
    fit = max(1, _SHARD_BYTES // (4 * max(1, sample_numel)))
    size = max(batch_size, min(fit, _MAX_DEFAULT_SHARD) // batch_size * batch_size)
    return size


# ---- the job --------------------------------------------------------------------------------------


def sample_to_dir(
    checkpoint: str | os.PathLike,
    n: int,
    out: str | os.PathLike,
    *,
    batch_size: int = 256,
    seed: int = 0,
    shard_size: int | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    labels: str | int | None = None,
    data: str | None = None,
    fmt: str = "npz",
    device: str | torch.device | None = None,
    ema: bool = True,
    progress: bool = True,
    grid: bool = True,
    on_shard: Callable[[int, int], None] | None = None,
    which: str | int | None = None,
    compile: bool = False,
) -> dict[str, Any]:
    """Write samples 0 .. n-1 of ``checkpoint`` (a file or a training directory) to ``out``.

    Resumes a job already in ``out`` (same checkpoint and settings: complete shards are kept);
    refuses another job's directory, or a non-empty directory that is not a sampling job's.
    ``batch_size`` is the chunk one ``model.sample`` call gets (not part of the job's
    identity: change it freely between runs); ``shard_size`` the samples per shard (default:
    the existing job's, else multiples of ``batch_size`` up to about 64 MB). ``sampler``,
    ``steps``, ``guidance`` go to diffusion models (``sampler=``, ``steps=``,
    ``guidance_scale=``); ``labels``: see :func:`parse_labels`; ``data``: the data spec
    whose test inputs a super-resolution model up-samples (sample i: input i mod its size).
    ``ema``: sample with the checkpoint's EMA weights (False: the raw ones; part of the job's
    identity, like the seed and the sampler settings, which the manifest records with their
    defaults filled in). ``on_shard(start, stop)`` is called after each shard this process
    wrote. ``which``: a training directory's checkpoint, "best", "latest" or a step (default:
    best.pt when the run kept one, else the latest; see :func:`pygen._io.select_checkpoint`);
    the manifest records the file and its sha256. Under torchrun (WORLD_SIZE > 1) every rank
    must call it with the same arguments.

    ``compile``: torch.compile the diffusion networks first
    (:func:`pygen.models.inference.compile_denoisers`; the first chunk pays the compilation);
    not part of the identity, like ``batch_size``: it changes samples by float rounding only.

    Returns the manifest (the final one on rank 0; the planned one on the other ranks).
    Raises :class:`SamplingError` for a job that cannot run as asked.
    """
    from pygen.models import load
    from pygen._io import select_checkpoint
    from pygen.train import ddp

    for name, v in {"n": n, "batch_size": batch_size}.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SamplingError(f"{'-n' if name == 'n' else '--batch-size'} must be a positive integer, got {v!r}")
    if shard_size is not None and (not isinstance(shard_size, int) or shard_size < 1):
        raise SamplingError(f"--shard-size must be a positive integer, got {shard_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SamplingError(f"--seed must be an integer >= 0, got {seed!r}")
    if fmt not in ("npz", "png"):
        raise SamplingError(f"--format must be npz or png, got {fmt!r}")
    labels = parse_labels(labels)
    out = Path(out)
    try:
        ckpt_file = select_checkpoint(checkpoint, which)
    except (FileNotFoundError, ValueError) as e:
        raise SamplingError(str(e)) from None
    if ckpt_file is None:
        raise SamplingError(f"{checkpoint} holds no checkpoint (no 'latest' file, no ckpt-*.pt)")

    check_device(device)
    info = ddp.setup(device)
    failed = True
    try:
        with ExitStack() as held:
            manifest = _run(ckpt_file, n, out, info, batch_size=batch_size, seed=seed, shard_size=shard_size,
                            sampler={"sampler": sampler, "steps": steps, "guidance_scale": guidance}, labels=labels,
                            data=data, fmt=fmt, ema=ema, progress=progress, grid=grid, load=load,
                            on_shard=on_shard, held=held, compile=compile)  # fmt: skip
        failed = False
        return manifest
    finally:
        ddp.teardown(info, failed=failed)


def check_device(device: str | torch.device | None) -> None:
    """A device this machine has (a clear error instead of CUDA's traceback)."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise SamplingError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SamplingError(f"--device {device}: no CUDA device is visible here (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SamplingError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def manifest_family(model: Any) -> str:
    return getattr(model, "family", type(model).__name__)


def _barrier(info: Any) -> None:
    if info.distributed:
        torch.distributed.barrier()


def _run(ckpt_file: Path, n: int, out: Path, info: Any, *, batch_size: int, seed: int, shard_size: int | None,
         sampler: dict[str, Any], labels: str | int | None, data: str | None, fmt: str, ema: bool, progress: bool,
         grid: bool, load: Any, on_shard: Callable[[int, int], None] | None, held: ExitStack,
         compile: bool = False) -> dict[str, Any]:  # fmt: skip
    device, rank, world = info.device, info.rank, info.world_size
    try:
        model = load(ckpt_file, ema=ema, map_location=device)
    except (OSError, RuntimeError, ValueError, KeyError, EOFError) as e:
        raise SamplingError(f"cannot load the checkpoint {ckpt_file}: {str(e).splitlines()[0] if str(e) else e}") from None
    if compile:
        from pygen.models.inference import compile_denoisers

        if not compile_denoisers(model):
            raise SamplingError(f"--compile compiles diffusion networks; {ckpt_file} holds a "
                                f"{manifest_family(model)} model")
    low_res = None
    if data is not None:
        import pygen.data

        _, test = pygen.data.train_test(pygen.data.load(data))  # DataError: a user mistake, passed on
        low_res = test.low_res
    job = _Job(model, seed=seed, sampler=sampler, labels=labels, low_res=low_res, device=device)
    try:  # the sample shape, and an early failure (a bad --sampler, --steps, ...) before any file is written
        probe = job(0, 1)[0]
    except (ValueError, TypeError) as e:
        raise SamplingError(f"the {manifest_family(model)} model cannot sample with these settings: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    _check_finite(probe, 0, 1)
    if fmt == "png" and not (probe.dim() == 3 and probe.shape[0] in (1, 3)):
        raise SamplingError(f"--format png needs images of 1 or 3 channels; this model samples {tuple(probe.shape)}")

    _check_writable(out)
    from pygen.train import ddp

    try:  # one job per directory, held by ``held`` until the job ends; before anything is written
        held.enter_context(ddp.job_lock(out, info, "sampling directory"))
    except DirectoryBusy as e:
        raise SamplingError(str(e)) from None
    except OSError as e:
        raise SamplingError(f"cannot write to --out {out}: {e.strerror or e}") from None
    _check_space(out, n, probe, fmt)
    old = _read_manifest(out)
    if old is None and not _is_empty(out):
        raise SamplingError(f"{out} is not empty and holds no {MANIFEST}: not a sampling directory; "
                            "use a new or empty --out")
    if shard_size is None:
        shard_size = int(old["shard_size"]) if old and "shard_size" in old else \
            _default_shard_size(batch_size, probe.numel())
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "checkpoint": str(ckpt_file.resolve()),
        "checkpoint_sha256": file_sha256(ckpt_file),
        "family": getattr(model, "family", type(model).__name__),
        "seed": seed,
        "n": n,
        "shard_size": shard_size,
        "format": fmt,
        "sampler": job.sampler,  # the settings used, defaults filled in
        "labels": labels,
        "data": data,
        "ema": ema,
        "sample_shape": list(probe.shape),
        "complete": False,
    }
    if old is not None:  # an older manifest may hold only the settings given: compare what they resolve to
        old = {**old, "sampler": resolve_settings(model, old.get("sampler") or {})}
        _check_same_job(out, old, manifest)
    shards = plan_shards(n, shard_size)
    manifest["shards"] = [_shard_entry(a, b, fmt) for a, b in shards]
    if rank == 0:
        from pygen.train.checkpoint import remove_temp_files

        remove_temp_files(out)  # what a killed writer left behind (never under a final name)
        manifest["created"] = old.get("created", _now()) if old else _now()
        _write_json(out / MANIFEST, manifest)
    _barrier(info)
    todo = [s for s in shards if not _shard_complete(out, *s, fmt)] if rank == 0 else None
    todo = _broadcast(todo, info)  # one listing, rank 0's: every rank splits the same list
    mine = todo[rank::world]

    pbar = None
    total = sum(b - a for a, b in mine)
    if progress and rank == 0 and total:
        from tqdm.auto import tqdm

        pbar = tqdm(total=total, unit="sample", unit_scale=True, dynamic_ncols=True,
                    desc=f"sampling ({len(todo)} of {len(shards)} shards to do" + (f", {world} ranks)" if world > 1 else ")"))
    t0 = time.perf_counter()
    try:
        for a, b in mine:
            parts = []
            for i in range(a, b, batch_size):
                m = min(batch_size, b - i)
                parts.append(job(i, m))
                if pbar is not None:
                    pbar.update(m)
            x = torch.cat(parts)
            _check_finite(x, a, b)  # a shard is complete only with finite samples
            try:
                _write_shard(out, a, x, fmt)
            except OSError as e:  # a full disk, a vanished mount: one line, the complete shards stay
                raise SamplingError(f"cannot write samples {a}..{b - 1} to {out}: {e.strerror or e}; the complete "
                                    "shards are kept: free space and run the same command to go on") from None
            if on_shard is not None:
                on_shard(a, b)
    finally:
        if pbar is not None:
            pbar.close()
    elapsed = time.perf_counter() - t0
    _barrier(info)
    total_all = sum(b - a for a, b in todo)
    if rank != 0:
        return manifest
    missing = [s for s in shards if not _shard_complete(out, *s, fmt)]
    if missing:
        raise RuntimeError(f"{len(missing)} shards are missing after sampling (first: {missing[0]}): run again to redo them")
    import pygen

    manifest.update(complete=True, updated=_now(), batch_size=batch_size, world_size=world, device=str(device),
                    seconds=round(elapsed, 3), sampled=total_all,
                    versions={"pygen": str(pygen.__version__), "torch": torch.__version__})
    _write_json(out / MANIFEST, manifest)
    if grid:
        write_grid(out)
    return manifest


def _shard_entry(a: int, b: int, fmt: str) -> dict[str, Any]:
    return {"start": a, "stop": b, "file": shard_file(a, b) if fmt == "npz" else f"{png_file(a)} .. {png_file(b - 1)}"}


def _broadcast(obj: Any, info: Any) -> Any:
    if not info.distributed:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def write_grid(out: str | os.PathLike, count: int = 64) -> Path | None:
    """``out/grid.png``: the first ``count`` samples of a sampling directory (images of 1 or 3
    channels; None for other data)."""
    from pygen.images import save_grid

    d = SampleDir(out)
    shape = d.sample_shape
    if len(shape) != 3 or shape[0] not in (1, 3):
        return None
    x = d.read(0, min(count, d.n))
    return save_grid(x, Path(out) / "grid.png", nrow=min(8, len(x)), scale=max(1, 64 // shape[-1]))


# ---- reading a sampling directory -----------------------------------------------------------------


def _valid_manifest(m: Any, path: Path) -> tuple[int, int, str, tuple[int, ...]]:
    """(n, shard_size, format, sample_shape) of a manifest, each checked: a damaged or hand-made
    one is one clear error, and its size claims are bounded by the shards it lists."""
    def bad(what: str) -> SamplingError:
        return SamplingError(f"{path} is not a valid manifest ({what}): rerun the sampling job into a new directory")

    if not isinstance(m, dict):
        raise bad(f"a JSON {type(m).__name__}, not an object")
    for key in ("n", "shard_size"):
        v = m.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise bad(f"{key} must be a positive integer, got {v!r}")
    n, size, fmt, shape = m["n"], m["shard_size"], m.get("format"), m.get("sample_shape")
    if fmt not in ("npz", "png"):
        raise bad(f"format must be npz or png, got {fmt!r}")
    if not (isinstance(shape, list) and shape and all(type(d) is int and d >= 1 for d in shape)):
        raise bad(f"sample_shape must be a list of positive integers, got {shape!r}")
    shards = m.get("shards")
    if not isinstance(shards, list) or len(shards) != -(-n // size):
        listed = len(shards) if isinstance(shards, list) else "no"
        raise bad(f"it lists {listed} shards for n={n} in shards of {size}")
    return n, size, fmt, tuple(shape)


class SampleDir:
    """The samples of a complete sampling directory, read shard by shard.

    ``read(start, stop)`` -> (stop - start, *shape) float32; ``sample(n, *, seed=None,
    offset=0)`` is ``read(offset, offset + n)``: the directory stands in for a model in
    :func:`pygen.metrics.evaluate` (which streams it in chunks). ``seed`` is ignored: the
    directory's samples are those of its manifest's seed.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise SamplingError(f"no sampling directory at {self.path}")
        m = _read_manifest(self.path)
        if m is None:
            raise SamplingError(f"{self.path} holds no {MANIFEST}: not a sampling directory")
        self.manifest = m
        self.n, size, self.fmt, self.sample_shape = _valid_manifest(m, self.path / MANIFEST)
        self.shards = plan_shards(self.n, size)

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def read(self, start: int, stop: int) -> Tensor:
        if not 0 <= start <= stop <= self.n:
            raise SamplingError(f"{self.path} holds samples 0..{self.n - 1}; asked for [{start}, {stop})")
        if self.fmt == "png":
            ch = self.sample_shape[0]
            return torch.stack([_read_png(self.path / png_file(i), ch) for i in range(start, stop)]) \
                if stop > start else torch.empty(0, *self.sample_shape)
        parts = []
        for a, b in self.shards:
            if b <= start or a >= stop:
                continue
            path = self.path / shard_file(a, b)
            if not path.exists():
                raise SamplingError(f"{path} is missing: the sampling job is not complete (run it again to finish)")
            with np.load(path) as z:
                parts.append(torch.from_numpy(z["samples"][max(start, a) - a : min(stop, b) - a]))
        return torch.cat(parts) if parts else torch.empty(0, *self.sample_shape)

    def __iter__(self) -> Iterator[tuple[int, Tensor]]:
        """(start, samples) per shard, in index order."""
        for a, b in self.shards:
            yield a, self.read(a, b)

    def __len__(self) -> int:
        return self.n

    def sample(self, n: int, *, seed: int | None = None, offset: int = 0, **cond: Any) -> Tensor:
        if offset + n > self.n:
            raise SamplingError(f"{self.path} holds {self.n} samples; {offset + n} are needed "
                                f"(sample more, or pass a smaller --n)")
        return self.read(offset, offset + n)


def describe(manifest: dict[str, Any]) -> str:
    """One line about a finished job."""
    secs, done = manifest.get("seconds") or 0, manifest.get("sampled", 0)
    rate = f"; this run sampled {done:,} in {secs:.1f} s ({done / secs:,.0f} samples/s)" if secs and done else ""
    return (f"{manifest['n']:,} samples of {manifest['family']} (seed {manifest['seed']}) in "
            f"{len(manifest['shards'])} {'shards' if manifest['format'] == 'npz' else 'PNG ranges'}{rate}")

