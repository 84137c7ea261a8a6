"""The ``pygen`` command line (``python -m pygen`` is the same): info, train, sample, eval, bench, demo.

Each command parses its arguments and calls the library (:func:`pygen.train.fit`,
:func:`pygen.sampling.sample_to_dir`, :func:`pygen.metrics.evaluate`, the benchmark suites,
:mod:`pygen.demo`); nothing else lives here. A user mistake (a missing checkpoint, N <= 0, an
unknown family, an unwritable or incompatible directory, unreadable data) is one line on
stderr and exit status 2; Ctrl-C is exit status 130 and leaves no partial file under a final
name.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

__all__ = ["main", "UserError"]

EXIT_USER = 2
EXIT_INTERRUPT = 130


class UserError(Exception):
    """A mistake in the command (printed as one line, exit status 2)."""


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _fmt() -> type[argparse.HelpFormatter]:
    return argparse.RawDescriptionHelpFormatter


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own status), no usage dump
        self.exit(EXIT_USER, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---- info -------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    import platform

    import numpy
    import torch

    import pygen

    print(f"pygen {pygen.__version__}  ({Path(pygen.__file__).parent})")
    print(f"python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}", end="")
    for mod in ("triton", "tqdm", "PIL", "matplotlib", "sklearn"):
        try:
            m = __import__(mod)
            print(f", {mod} {getattr(m, '__version__', '?')}", end="")
        except ImportError:
            print(f", {mod} not installed", end="")
    print()
    print(f"cpu: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB "
                  f"(torch built with CUDA {torch.version.cuda})")
    else:
        built = f"torch built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only torch build"
        print(f"cuda: no device visible ({built})")
    try:
        from pygen import _C

        archs = _C.cuda_archs() or "none"
        print(f"extension: {Path(_C.__file__).name}; CUDA kernels built for: {archs}")
    except Exception as e:  # noqa: BLE001 - report, do not fail
        print(f"extension: not importable ({e})")
    print("backends:")
    for name, why in pygen.backend_status().items():
        print(f"  {name:7s} {'usable' if why is None else 'not usable: ' + why}")
    print(f"available: {', '.join(pygen.available_backends())} (--backend auto picks the fastest of these per op)")
    return 0


# ---- train --------------------------------------------------------------------------------

TRAIN_JSON = "train.json"  # the command's settings, so that --resume needs no repetition
TRAIN_KEYS = ("steps", "batch_size", "lr", "seed", "lr_schedule", "warmup", "weight_decay", "grad_clip", "grad_accum",
              "precision", "keep_best", "early_stop", "tensorboard", "sample_every", "eval_fd_every", "log_every",
              "eval_every", "checkpoint_every")
#: the trainer settings' values when neither the command, --config nor train.json gives one
TRAIN_FALLBACKS = {"seed": 0, "lr_schedule": "constant", "warmup": 0, "weight_decay": None, "grad_clip": None,
                   "grad_accum": 1, "precision": "fp32", "keep_best": None, "early_stop": None, "tensorboard": False,
                   "sample_every": None, "eval_fd_every": None, "log_every": 100, "eval_every": 500,
                   "checkpoint_every": 500}


def _int_at_least(lowest: int) -> Any:
    """An argparse type: an int >= lowest (checked at parse time: one line, exit 2)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lowest:
            raise argparse.ArgumentTypeError(f"must be >= {lowest}, got {v}")
        return v

    return parse


def _nonnegative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (v >= 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def _positive_float(text: str) -> float:
    v = _nonnegative_float(text)
    if v == 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def _check_writable_file(path: str | None, flag: str) -> None:
    """Refuse an output file that cannot be written before the work that fills it runs."""
    if path is None:
        return
    import tempfile as _tempfile

    target = Path(path)
    if target.is_dir():
        raise UserError(f"{flag} {path} is a directory; expected a file name")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _tempfile.NamedTemporaryFile(dir=target.parent, prefix=".tmp-check-"):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None


def _callbacks(settings: dict[str, Any], model: Any, test: Any) -> list[Any]:
    """The trainer callbacks the settings ask for (held-out FD first: the best checkpoint may
    be chosen by it; TensorBoard last: it logs what the others added)."""
    from pygen.train import callbacks as C

    cbs: list[Any] = []
    if settings["eval_fd_every"]:
        try:
            cbs.append(C.HeldOutFD(test, settings["eval_fd_every"]))
        except ValueError as e:
            raise UserError(f"--eval-fd-every: {e}") from None
    metric = settings["keep_best"] or ("auto" if settings["early_stop"] else None)
    if metric == "auto":
        metric = "eval_ema/loss" if getattr(model, "ema_decay", None) is not None else "eval/loss"
    if metric is not None:
        cbs.append(C.BestCheckpoint(metric, patience=settings["early_stop"]))
    tb = None
    if settings["tensorboard"]:
        try:
            tb = C.TensorBoard()
        except ImportError as e:
            raise UserError(f"--tensorboard: {e}") from None
    if settings["sample_every"]:
        cbs.append(C.SampleGrids(settings["sample_every"], tensorboard=tb))
    return cbs + ([tb] if tb is not None else [])


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _read_config(path: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """--config FILE -> (train settings, model options). The file is a JSON object: keys
    steps / batch_size / lr / seed, and the model's options either under "model" or at the
    top level."""
    if path is None:
        return {}, {}
    try:
        cfg = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--config {path}: not a JSON file ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"--config {path}: expected a JSON object, got {type(cfg).__name__}")
    train = {k: cfg.pop(k) for k in TRAIN_KEYS if k in cfg}
    model = cfg.pop("model", {})
    if not isinstance(model, dict):
        raise UserError(f"--config {path}: 'model' must be an object")
    return train, {**cfg, **model}


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    import pygen.data
    from pygen.cli import families as F

    fam = F.FAMILIES[args.family]
    out = Path(args.out)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    saved: dict[str, Any] = {}
    if args.resume and (out / TRAIN_JSON).exists():
        try:
            saved = json.loads((out / TRAIN_JSON).read_text())
            if not isinstance(saved, dict):
                raise ValueError(f"a JSON {type(saved).__name__}, not an object")
        except (OSError, ValueError) as e:  # damaged bytes: say so, change nothing
            raise UserError(f"{out / TRAIN_JSON} (the run's settings) is damaged ({e}): restore it, or delete it and "
                            "give the run's options again with --resume") from None
        if saved.get("family") != args.family and not (args.family, saved.get("family")) == ("diffusion",
                                                                                              "latent-diffusion"):
            raise UserError(f"{out} holds a {saved.get('family')!r} run, not {args.family!r}")
    cfg_train, cfg_model = _read_config(args.config)
    if args.minutes is not None and "steps" in cfg_train:
        raise UserError(f"--minutes sets the step count: {args.config} gives steps too; drop one")
    options = {**saved.get("options", {}), **cfg_model}
    for flag in fam.flags:
        dest = flag.lstrip("-").replace("-", "_")
        if getattr(args, dest, None) is not None:
            options[dest] = getattr(args, dest)
    for other in F.FAMILIES.values():
        for flag in other.flags:
            dest = flag.lstrip("-").replace("-", "_")
            if flag not in fam.flags and getattr(args, dest, None) is not None:
                raise UserError(f"{flag} is an option of {other.name}, not of {args.family}")
    for item in args.option or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--option expects KEY=VALUE, got {item!r}")
        options[key.replace("-", "_")] = _parse_value(value)

    data_spec = args.data or saved.get("data")
    if data_spec is None:
        raise UserError("--data SPEC is required (a name such as digits, or a path)")
    if args.threads:
        torch.set_num_threads(args.threads)
    from pygen.sampling import check_device

    check_device(args.device)
    image_size = args.image_size if args.image_size is not None else saved.get("image_size")
    if saved and args.image_size is not None and args.image_size != saved.get("image_size"):
        raise UserError(f"{out} was trained with --image-size {saved.get('image_size')}, not {args.image_size}: "
                        "resume without it, or use another --out")
    data = pygen.data.load(data_spec, image_size=image_size)  # DataError: one line
    train, test = pygen.data.train_test(data)
    if len(train) == 0 or len(test) == 0:
        raise UserError(f"{data_spec}: {len(data)} example(s); training needs at least 2 (a share is held out)")
    from pygen.models.latent import latent_by_default

    pixel = options.pop("pixel", None)
    latent = not saved and not pixel and latent_by_default(tuple(train.shape), args.device)
    if args.family == "diffusion" and (saved.get("family") == "latent-diffusion" or latent):
        fam = F.FAMILIES["latent-diffusion"]
        if rank0 and not saved:
            print(f"diffusion of {'x'.join(map(str, train.shape))} images on the CPU: latent diffusion, the faster "
                  "to a good model here (pygen train diffusion --pixel: in pixel space)", flush=True)
    preset_name, preset = _preset(args, saved, fam)
    options = {**preset.get("model", {}), **options}  # the preset under everything given
    defaults = {**fam.train(train), **preset.get("train", {})}
    if rank0 and not saved and preset:
        print(f"preset {preset_name}: {_describe(preset)} where not given (--preset cpu: the CPU defaults)",
              flush=True)
    cap = fam.model.train_minutes  # the family's wall-clock cap on its default step count
    settings = {**TRAIN_FALLBACKS, **defaults, **{k: v for k, v in saved.items() if k in TRAIN_KEYS}, **cfg_train}
    default_steps = args.steps is None and "steps" not in cfg_train and "steps" not in saved
    for key in TRAIN_KEYS:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    for key in ("steps", "batch_size"):
        if not isinstance(settings[key], int) or settings[key] < 1:
            raise UserError(f"--{key.replace('_', '-')} must be a positive integer, got {settings[key]!r}")
    from pygen._io import gigabytes, memory_bytes
    from pygen.models.base import meta_bytes

    weights = meta_bytes(lambda: fam.build(train, dict(options)))  # before allocating: 4000x4000 images...
    if 4 * weights > memory_bytes():  # weights, gradients and Adam's two moments
        raise UserError(f"a {args.family} model for {data_spec} (examples of shape {tuple(train.shape)}) with "
                        f"{options or 'the default options'} holds {gigabytes(weights)} of weights; training needs "
                        f"about 4x that, more than this machine's {gigabytes(memory_bytes())}: use smaller images "
                        "or a smaller network (--option)")  # fmt: skip
    torch.manual_seed(settings["seed"])  # the model's initialisation
    try:
        model = fam.build(train, dict(options))
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot build a {args.family} model for {data_spec} with {options}: {e}") from None
    record = {"family": fam.name, "data": data_spec, "preset": preset_name, **settings, "options": options,
              "command": "pygen " + " ".join(sys.argv[1:])}
    if image_size is not None:
        record["image_size"] = image_size
    how_set = ("minutes", "default_minutes_cap", "measured_seconds_per_step", "measured_seconds_per_first_stage_step")
    for key in how_set:  # how the step count was set
        if key in saved:
            record[key] = saved[key]
    if data.classes is not None:  # what label k means (a folder's sub-folder names)
        record["classes"] = list(data.classes)
    with ExitStack() as held:
        if rank0:
            if out.exists() and not out.is_dir():
                raise UserError(f"--out {out} exists and is not a directory")
            from pygen._lock import lock_directory

            try:  # one job per run directory, before anything is written (fit takes it again)
                held.enter_context(lock_directory(out, "run directory"))
            except OSError as e:
                raise UserError(f"cannot write to --out {out}: {e.strerror or e}") from None
            is_run = (out / "latest").exists() or any(out.glob("ckpt-*.pt"))
            if is_run and not args.resume:
                raise UserError(f"{out} already holds a training run: pass --resume to continue it, or another --out")
        if args.minutes is not None:
            _budget_steps(args, model, train, settings, record)
        elif default_steps and cap is not None:
            _budget_steps(args, model, train, settings, record, cap=cap)
        from pygen.train.budget import stage_options

        stages = {} if saved or "ae_steps" in options else stage_options(model, settings["steps"])
        if stages:  # a staged model sized for the run's length
            options.update(stages)  # into train.json: a resume rebuilds the same model
            torch.manual_seed(settings["seed"])
            model = fam.build(train, dict(options))
        return _train(args, model, train, test, settings, record, data_spec, rank0)


def _preset(args: argparse.Namespace, saved: dict[str, Any], fam: Any) -> tuple[str, dict[str, Any]]:
    """(name, {"train": ..., "model": ...}) of the settings preset: --preset, else the resumed
    run's, else "gpu" when training on CUDA and the family has one, else "cpu" (the class
    defaults, an empty preset)."""
    import torch

    if saved and args.preset and saved.get("preset", "cpu") != args.preset:
        raise UserError(f"{args.out} was trained with --preset {saved.get('preset', 'cpu')}, not {args.preset}: "
                        "resume without it, or use another --out")
    # a resumed run keeps its preset (runs from before presets, or without a train.json: cpu)
    name = args.preset or (saved.get("preset", "cpu") if saved or args.resume else None)
    if name is None:
        on_cuda = torch.device(args.device).type == "cuda" if args.device else torch.cuda.is_available()
        name = "gpu" if on_cuda and "gpu" in fam.model.presets else "cpu"
    if name == "cpu":
        return name, {}
    if name not in fam.model.presets:
        raise UserError(f"--preset {name}: the {fam.name} family has no such preset (it has: "
                        f"{', '.join(['cpu', *fam.model.presets])})")
    return name, fam.model.presets[name]


def _describe(preset: dict[str, Any]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for part in ("model", "train") for k, v in preset.get(part, {}).items())


def _budget_steps(args: argparse.Namespace, model: Any, train: Any, settings: dict[str, Any],
                  record: dict[str, Any], cap: float | None = None) -> None:
    """--minutes M: the step count from this machine's measured throughput, into the settings
    and train.json (a resume then continues to the same count: it stays exact). ``cap``: no
    --steps or --minutes given; the family's default step count, cut to what fits in ``cap``
    minutes here."""

    from pygen.models.labels import training_data
    from pygen.train.budget import plan_for_minutes

    minutes = cap if cap is not None else args.minutes
    if cap is None and args.steps is not None:
        raise UserError("--minutes sets the step count: give --steps or --minutes, not both")
    if cap is None and args.resume and (Path(args.out) / TRAIN_JSON).exists():
        raise UserError("--minutes sets the step count of a new run; to train a resumed run longer, --resume --steps N")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if cap is not None:
            return  # under torchrun the default step count stands (no one-process probe)
        raise UserError("--minutes measures one process's throughput; under torchrun pass --steps")
    what = f"--minutes {minutes:g}" if cap is None else f"the default cap of {minutes:g} minutes"
    print(f"measuring this machine's training throughput for {what} ...", flush=True)
    try:
        steps, sec, first_sec = plan_for_minutes(
            model, training_data(model, train), minutes, batch_size=settings["batch_size"], lr=settings["lr"],
            spent=time.perf_counter() - args.started,
            grad_accum=settings["grad_accum"], precision=settings["precision"], device=args.device)  # fmt: skip
    except (ValueError, RuntimeError) as e:  # settings fit refuses: the real run says so in its own words
        if cap is not None:
            return
        raise UserError(f"cannot measure the throughput for --minutes: {str(e).splitlines()[0]}") from None
    if first_sec is not None:
        print(f"{first_sec:.3g} s per step of its first stage", flush=True)
        record["measured_seconds_per_first_stage_step"] = round(first_sec, 6)
    if cap is not None:
        fits = steps
        steps = min(settings["steps"], fits)
        print(f"{sec:.3g} s per step of {settings['batch_size']}: {fits} steps fit in {minutes:g} minutes; training "
              f"{steps} of the default {settings['steps']} (--steps or --minutes to choose)", flush=True)
        record["default_minutes_cap"] = minutes
    else:
        print(f"{sec:.3g} s per step of {settings['batch_size']}: {steps} steps in {minutes:g} minutes", flush=True)
        record["minutes"] = minutes
    settings["steps"] = record["steps"] = steps
    record["measured_seconds_per_step"] = round(sec, 6)


def _train(args: argparse.Namespace, model: Any, train: Any, test: Any, settings: dict[str, Any],
           record: dict[str, Any], data_spec: str, rank0: bool) -> int:  # fmt: skip
    from pygen._io import write_text_atomic

    out = Path(args.out)
    nparams = model.num_parameters()  # without EMA copies
    if rank0:
        print(f"training {record['family']} ({nparams:,} parameters) on {data_spec} ({len(train)} train / {len(test)} test "
              f"examples of shape {tuple(train.shape)}): {settings['steps']} steps of {settings['batch_size']}, "
              f"lr {settings['lr'] if settings['lr'] is not None else 'default'}, seed {settings['seed']} -> {out}",
              flush=True)
    from pygen.models.labels import training_data
    from pygen.train import TrainingDiverged, fit
    from pygen.train.callbacks import Callback

    class WriteSettings(Callback):
        """train.json, written when training starts: after fit accepted the run, so that a
        refused ``--resume`` leaves the old settings in place."""

        def on_start(self, run: Any) -> None:
            if rank0:
                write_text_atomic(out / TRAIN_JSON, json.dumps(record, indent=1) + "\n")

    callbacks = [WriteSettings(), *_callbacks(settings, model, test)]
    try:
        history = fit(
            model, training_data(model, train), steps=settings["steps"], batch_size=settings["batch_size"],
            lr=settings["lr"], seed=settings["seed"], out=out, resume=args.resume, progress=not args.no_progress,
            log_every=settings["log_every"], eval_every=settings["eval_every"], eval_data=training_data(model, test),
            checkpoint_every=settings["checkpoint_every"], device=args.device, lr_schedule=settings["lr_schedule"],
            warmup=settings["warmup"], weight_decay=settings["weight_decay"], grad_clip=settings["grad_clip"],
            grad_accum=settings["grad_accum"], precision=settings["precision"], callbacks=callbacks,
            compile=args.compile,
        )  # fmt: skip
    except FileExistsError as e:
        raise UserError(str(e).replace("resume=True", "--resume")) from None
    except OSError as e:  # a full disk while writing a checkpoint or the log: the complete ones stay
        import errno

        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO):
            raise
        from pygen._io import resolve_checkpoint

        kept = resolve_checkpoint(out) if out.is_dir() else None
        raise UserError(f"cannot write to {out}: {e.strerror or e}; latest complete checkpoint: {kept or 'none'} "
                        "(free space, then --resume)") from None
    except TrainingDiverged as e:  # not a usage mistake (exit 1), but one clear line too
        print(f"pygen train: training diverged: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # a resume from another model config or schedule, batch size not divisible, precision
        if any(w in str(e) for w in ("resume", "divisible", "precision", "grad_accum", "lr_schedule", "warmup",
                                     "weight_decay", "lr schedulers")):
            raise UserError(str(e)) from None
        raise
    if rank0:
        stop = next((r for r in history if r.get("stopped_early")), None)
        if stop is not None:
            print(f"stopped early at step {stop['step']} (--early-stop {settings['early_stop']})")
        best = out / "best.pt"
        if best.exists():
            import torch as _t

            info = _t.load(best, map_location="cpu", weights_only=True).get("best", {})
            print(f"best: {best} (step {info.get('step')}, {info.get('metric')} = {info.get('value', float('nan')):.6g}); "
                  f"pygen sample / eval use it unless --checkpoint latest")
        print(f"done: {out}/latest -> {(out / 'latest').read_text().strip()}; log {out}/metrics.jsonl")
        sized = f" --image-size {record['image_size']}" if "image_size" in record else ""
        print(f"next: pygen sample {out} -n 10000 --out {out}-samples    pygen eval {out} --data {data_spec}{sized}")
        if args.evaluate:
            _print_eval(_evaluate(str(out), data_spec, seed=0, n=None, image_size=record.get("image_size")), None)
    return 0


# ---- sample -------------------------------------------------------------------------------


def cmd_sample(args: argparse.Namespace) -> int:
    from pygen.sampling import describe, sample_to_dir

    manifest = sample_to_dir(
        args.checkpoint, args.n, args.out, batch_size=args.batch_size, seed=args.seed, shard_size=args.shard_size,
        sampler=args.sampler, steps=args.steps, guidance=args.guidance, labels=args.labels, data=args.data,
        fmt=args.format, device=args.device, ema=not args.no_ema, progress=not args.no_progress, which=args.which,
        compile=args.compile,
    )  # fmt: skip
    if int(os.environ.get("RANK", "0")) == 0:
        grid = Path(args.out) / "grid.png"
        print(f"{describe(manifest)} from {manifest['checkpoint']} -> {args.out} "
              f"(manifest.json, shards{', grid.png' if grid.exists() else ''})")
    return 0


# ---- eval ---------------------------------------------------------------------------------


def _saved_image_size(source: str, data: str) -> int | None:
    """The --image-size a training run used on ``data`` (its train.json, next to the checkpoint
    or in the run directory), so that `pygen eval RUN --data FOLDER` sees what it trained on."""
    path = Path(source)
    for d in (path, path.parent):
        f = d / TRAIN_JSON
        if f.is_file():
            try:
                rec = json.loads(f.read_text())
            except (OSError, ValueError):
                return None
            return rec.get("image_size") if rec.get("data") == data else None
    return None


def _evaluate(source: str, data: str, *, seed: int, n: int | None, ema: bool = True,
              which: str | None = None, image_size: int | None = None) -> dict[str, Any]:
    import pygen.data
    from pygen.metrics import evaluate

    path = Path(source)
    if image_size is None:
        image_size = _saved_image_size(source, data)
    loaded = pygen.data.load(data, image_size=image_size) if image_size is not None else data
    if path.is_dir() and (path / "manifest.json").exists():
        from pygen.sampling import SampleDir

        model: Any = SampleDir(path)
        if not model.complete:
            raise UserError(f"{path}: the sampling job is not complete; run the same pygen sample command to finish it")
        want = n
        if want is None:
            want = len(pygen.data.train_test(pygen.data.load(data, image_size=image_size))[1])
        if model.n < want:
            raise UserError(f"{path} holds {model.n} samples; the evaluation needs {want} (sample more or pass --n)")
    else:
        from pygen.models import load

        from pygen._io import select_checkpoint

        try:
            file = select_checkpoint(path, which)  # verified; a damaged latest falls back, saying so
            if file is None:
                raise FileNotFoundError(f"{path} holds no checkpoint (no 'latest' file, no ckpt-*.pt)")
            model = load(file, ema=ema)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(str(e)) from None
        if path.is_dir():
            print(f"evaluating {file}")
    try:
        return evaluate(model, loaded, seed=seed, n=n)
    except ValueError as e:  # evaluate checks that the model and the data fit each other
        raise UserError(f"{source} does not fit --data {data}: {str(e).splitlines()[0]}") from None


def _print_eval(results: dict[str, Any], json_path: str | None) -> None:
    from pygen.metrics import format_table

    print(format_table(results))
    if json_path:
        from pygen._io import write_text_atomic

        write_text_atomic(json_path, json.dumps(results, indent=1, default=float) + "\n")
        print(f"wrote {json_path}")


def cmd_eval(args: argparse.Namespace) -> int:
    if not Path(args.source).exists():
        raise UserError(f"no checkpoint, training directory or sampling directory at {args.source}")
    _check_writable_file(args.json, "--json")  # before the evaluation, not after it
    _print_eval(_evaluate(args.source, args.data, seed=args.seed, n=args.n, ema=not args.no_ema, which=args.which,
                          image_size=args.image_size), args.json)
    return 0


# ---- bench --------------------------------------------------------------------------------

SUITES = ("gaussian", "coupling", "diffusion", "schedulers", "networks", "sampling-job")
SCRIPTS = {"networks": "bench_networks.py", "sampling-job": "bench_sampling_job.py"}  # own tables, not pytest
GPU_OPS = {
    "gaussian": "reparameterize,gaussian_kl,reparameterize_kl",
    "coupling": "affine_coupling,rq_spline",
    "diffusion": "ddim_step,ddim_step_prev,ddim_step_eta1,ddpm_step,diffusion_loss,euler_ancestral_step,dpmpp_2m_step",
}


def _bench_dir() -> Path:
    import pygen

    d = Path(pygen.__file__).resolve().parents[1] / "benchmarks"
    if not (d / "summarize.py").exists():
        raise UserError(f"pygen bench runs the suites in the source tree's benchmarks/ (not found at {d}): "
                        "use a git clone installed with pip install -e .")
    return d


def cmd_bench(args: argparse.Namespace) -> int:
    bench = _bench_dir()
    suites = [args.suite] if args.suite else list(SUITES)
    env = dict(os.environ)
    if args.quick:
        env["PYGEN_BENCH_QUICK"] = "1"
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="pygen-bench-") as tmp:
        for suite in suites:
            path = Path(tmp) / f"{args.device}-{suite}.json"
            if suite == "networks":  # whole networks vs diffusers' UNet2DModel
                cmd = [sys.executable, str(bench / SCRIPTS[suite]), "--json", str(path), "--device", args.device]
                if args.quick:
                    cmd += ["--batch", "1,16", "--reps", "1"]
            elif suite == "sampling-job":  # the sampling job vs the network's own cost and a diffusers loop
                if args.device != "cpu":
                    print(f"== {suite}: CPU only for now, skipped on {args.device}", flush=True)
                    continue
                cmd = [sys.executable, str(bench / SCRIPTS[suite]), "--json", str(path)]
                if args.quick:
                    cmd += ["--shape", "1x16x16", "--batch", "4", "--chunks", "1", "--reps", "1"]
            elif args.device == "cuda":
                cmd = [sys.executable, str(bench / "gpu_bench.py"), "--out", str(path)]
                cmd += (["--ops", ""] if suite == "schedulers" else ["--ops", GPU_OPS[suite], "--schedulers", ""])
            else:
                cmd = [sys.executable, "-m", "pytest", str(bench / f"bench_{suite}.py"), "-q", "-p", "no:cacheprovider",
                       "--benchmark-group-by=group", "--benchmark-columns=median,iqr,ops", f"--benchmark-json={path}"]
                if args.quick:
                    cmd += ["--benchmark-max-time=0.05", "--benchmark-min-rounds=3"]
            print(f"== {suite} ({args.device}): {' '.join(cmd[1:])}", flush=True)
            proc = subprocess.run(cmd, cwd=bench.parent, env=env)
            if proc.returncode != 0 or not path.exists():
                print(f"pygen bench: the {suite} suite failed (exit status {proc.returncode})", file=sys.stderr)
                return 1
            print(flush=True)
            if suite not in SCRIPTS:
                subprocess.run([sys.executable, str(bench / "summarize.py"), str(path)], cwd=bench.parent, check=True)
                print(flush=True)
            results[suite] = json.loads(path.read_text())
    if args.json:
        from pygen._io import write_text_atomic

        write_text_atomic(args.json, json.dumps({"device": args.device, "quick": args.quick, "suites": results}) + "\n")
        print(f"wrote {args.json}")
    return 0


# ---- demo ---------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from pygen import demo

    if args.kernels:
        demo.kernels([] if not args.device else ["--device", args.device])
        return 0
    demo.run(args.out, quick=args.quick, families=args.families, threads=args.threads, data=args.data,
             minutes=args.minutes)
    return 0


# ---- the parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from pygen.cli.families import FAMILIES

    p = _Parser(prog="pygen", formatter_class=_fmt(),
                description="pygen's command line (python -m pygen is the same): train, sample at scale, evaluate, "
                            "benchmark. 'pygen COMMAND --help' for each.",
                epilog=_examples("pygen info", "pygen train flow --data digits --out runs/flow",
                                 "pygen sample runs/flow -n 100000 --out samples/flow",
                                 "pygen eval samples/flow --data digits", "pygen demo --quick"))
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser("info", help="versions, devices, which backends are built and usable",
                       formatter_class=_fmt(), description="Versions, devices, and which backends are usable here (and why not).",
                       epilog=_examples("pygen info"))
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser(
        "train", help="train a model (vae, gan, flow, diffusion, sr)", formatter_class=_fmt(),
        description=textwrap.dedent("""\
            Train a model with pygen.train.fit: progress bar, checkpoints (ckpt-<step>.pt, latest),
            metrics.jsonl and train.json in --out. --resume continues a run exactly (its settings come
            from train.json; pass a larger --steps to train longer). Under torchrun --nproc-per-node K
            it trains data-parallel (gloo on CPU, NCCL on GPU). The defaults of every family beat the
            fitted-Gaussian bar of `pygen eval` on --data digits in minutes on 2 CPU cores.

            """) + textwrap.fill("Families: " + "; ".join(f"{k}: {f.help}" for k, f in FAMILIES.items()), 92),
        epilog=_examples(
            "pygen train vae --data digits --out runs/vae",
            "pygen train gan --data digits16 --out runs/gan --steps 8000",
            "pygen train flow --data two_moons --out runs/moons --kind nsf",
            "pygen train flow --data my_images/ --out runs/f --config flow.json   # {\"steps\": 5000, \"model\": {\"depth\": 8}}",
            "pygen train vae --data digits --out runs/vae --resume --steps 4000",
            "torchrun --nproc-per-node 4 -m pygen train diffusion --data digits32 --out runs/ddpm"))
    s.add_argument("family", choices=list(FAMILIES), metavar="FAMILY", help=f"one of {', '.join(FAMILIES)}")
    s.add_argument("--data", metavar="SPEC", help="digits, digits16, digits32, a toy2d name, patches, fashion-mnist, "
                   "an image folder, .npy/.npz, IDX")
    s.add_argument("--image-size", type=_int_at_least(4), metavar="N",
                   help="an image folder's images resized (antialiased, shorter side N) and centre-cropped to NxN")
    s.add_argument("--out", required=True, metavar="DIR", help="run directory (checkpoints, log)")
    s.add_argument("--steps", type=_int_at_least(1),
                   help="optimizer steps in total (default: the family's, cut to what fits in 20 minutes here; "
                        "on images of 28x28 and up, a 2-core CPU trains the whole 20 minutes)")
    s.add_argument("--batch-size", type=_int_at_least(1), help="global batch (default: the family's)")
    s.add_argument("--lr", type=_positive_float, help="learning rate (default: the family's)")
    s.add_argument("--minutes", type=_positive_float, metavar="M",
                   help="train to a wall-clock budget: the step count is set from the throughput measured on this "
                        "machine before training (a copy of the model, a few steps) and saved in train.json")
    s.add_argument("--seed", type=_int_at_least(0), help="model init and data order (default 0)")
    s.add_argument("--preset", choices=("cpu", "gpu"),
                   help="the family's settings for this hardware (default gpu when training on CUDA, else cpu): "
                        "gpu trains wider networks on larger batches for more steps (sized for a 20-minute run on "
                        "one H100-class GPU, not yet measured there; the 20-minute cap applies); saved in train.json")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the model's loss (forward and backward): the first step compiles (~2-3 min "
                        "for the 28x28 UNet on a 2-core CPU); measured there: 5%% faster at batch 16, 25%% slower "
                        "at 128 (README, Networks)")
    s.add_argument("--resume", action="store_true", help="continue the run in --out")
    s.add_argument("--config", metavar="FILE", help="JSON: steps, batch_size, lr, seed and model options ('model': {...})")
    s.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="any model constructor option (JSON value), repeatable, e.g. --option ema_decay=0.999")
    s.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK when available)")
    s.add_argument("--threads", type=_int_at_least(1), help="torch CPU threads (tiny models: 1 is often fastest)")
    s.add_argument("--log-every", type=_int_at_least(1), metavar="N", help="steps between log records (default 100)")
    s.add_argument("--eval-every", type=_int_at_least(1), metavar="N",
                   help="steps between held-out losses (default 500)")
    s.add_argument("--checkpoint-every", type=_int_at_least(1), metavar="N",
                   help="steps between checkpoints (default 500)")
    s.add_argument("--evaluate", action="store_true", help="at the end, print pygen eval's table")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    t = s.add_argument_group("optimisation")
    t.add_argument("--lr-schedule", choices=("constant", "cosine", "linear"),
                   help="lr decay to 0 at --steps after the warm-up (default constant)")
    t.add_argument("--warmup", type=_int_at_least(0), metavar="STEPS", help="linear lr warm-up steps (default 0)")
    t.add_argument("--weight-decay", type=_nonnegative_float, metavar="WD",
                   help="decoupled weight decay (Adam becomes AdamW; default: none)")
    t.add_argument("--grad-clip", type=_positive_float, metavar="NORM",
                   help="clip each optimizer's total gradient norm to NORM, logged before clipping as grad_norm "
                        "(default: none)")
    t.add_argument("--grad-accum", type=_int_at_least(1), metavar="K",
                   help="micro-batches per optimizer step: the same --batch-size in 1/K of the memory (default 1)")
    t.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                   help="autocast dtype: bf16 (GPU, or a CPU with native bf16), fp16 (GPU, loss scaling); default fp32")
    m = s.add_argument_group("monitoring")
    m.add_argument("--keep-best", nargs="?", const="auto", metavar="METRIC",
                   help="keep best.pt, the checkpoint of the lowest held-out METRIC (default: eval_ema/loss, or "
                        "eval/loss without EMA; eval/fd with --eval-fd-every; max:KEY for higher is better); "
                        "sample and eval then use it")
    m.add_argument("--early-stop", type=_int_at_least(1), metavar="PATIENCE",
                   help="stop after PATIENCE held-out evaluations without improvement (implies --keep-best)")
    m.add_argument("--tensorboard", action="store_true", default=None,
                   help="log scalars (and --sample-every grids) to DIR/tensorboard (needs the tensorboard package)")
    m.add_argument("--sample-every", type=_int_at_least(1), metavar="N",
                   help="every N steps a grid of 64 samples as DIR/samples/step-<N>.png (image data)")
    m.add_argument("--eval-fd-every", type=_int_at_least(1), metavar="N",
                   help="every N steps the FD of 1000 samples vs the held-out split, logged as eval/fd")
    seen: set[str] = set()
    for f in FAMILIES.values():
        group = s.add_argument_group(f"{f.name} options") if any(fl not in seen for fl in f.flags) else None
        for flag, kw in f.flags.items():
            if flag not in seen:
                group.add_argument(flag, **kw)  # type: ignore[union-attr]
                seen.add(flag)
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser(
        "sample", help="N samples from a checkpoint into shards (resumable, torchrun-parallel)",
        formatter_class=_fmt(),
        description=textwrap.dedent("""\
            Draw N samples into --out: manifest.json, shards written atomically (npz: samples float32 +
            index int64; png: one image per sample named by its index) and grid.png. Sample i depends
            only on (checkpoint, seed, sampler settings, i): any --batch-size, any number of runs or
            ranks gives the same samples. Interrupted, the same command resumes (complete shards are
            kept); another checkpoint or setting in the same --out is refused. Under torchrun each
            rank samples its own shards."""),
        epilog=_examples(
            "pygen sample runs/flow -n 1000000 --out samples/flow --batch-size 4096",
            "pygen sample runs/vae/ckpt-2000.pt -n 64 --out grid --format png",
            "pygen sample runs/ddpm -n 50000 --out s --sampler ddim --steps 50 --labels cycle --guidance 2",
            "pygen sample runs/sr -n 1000 --out s --data patches",
            "torchrun --nproc-per-node 8 -m pygen sample runs/ddpm -n 10000000 --out /data/s --batch-size 2048"))
    s.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint file, or a training directory (its latest)")
    s.add_argument("-n", type=int, required=True, metavar="N", help="number of samples")
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--batch-size", type=int, default=256, help="samples per model call (default 256)")
    s.add_argument("--shard-size", type=int, help="samples per shard (default: batch multiples up to ~64 MB)")
    s.add_argument("--seed", type=_int_at_least(0), default=0, help="(default 0)")
    s.add_argument("--sampler", help="diffusion: ddpm, ddim, euler, euler_ancestral, dpmpp_2m (default: the model's)")
    s.add_argument("--steps", type=int, help="diffusion sampling steps (default: the sampler's: 1000, 50, 50, 50, 20)")
    s.add_argument("--labels", help="conditional models: random (default), cycle (i mod classes) or a class number")
    s.add_argument("--guidance", type=float, help="classifier-free guidance scale (conditional diffusion)")
    s.add_argument("--data", metavar="SPEC", help="super-resolution: the data whose test inputs are up-sampled")
    s.add_argument("--device", help="cpu, cuda (default: cuda:LOCAL_RANK when available)")
    s.add_argument("--format", choices=("npz", "png"), default="npz", help="(default npz)")
    s.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA ones")
    s.add_argument("--checkpoint", dest="which", metavar="best|latest|STEP",
                   help="a training directory's checkpoint (default: best.pt when the run kept one, else latest)")
    s.add_argument("--compile", action="store_true",
                   help="diffusion: torch.compile the network first (~1 min; the 28x28 UNet's forward was 1.24x "
                        "faster at batch 16 and 1.03x at 128 on a 2-core CPU); samples change by float rounding only")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_sample)

    s = sub.add_parser(
        "eval", help="quality indicators beside the data floor and the fitted-Gaussian bar", formatter_class=_fmt(),
        description="pygen.metrics.evaluate of a checkpoint (sampling it) or of a sampling directory (its first "
                    "n samples): FD, KID, precision/recall, density/coverage, NLL where the model has one, "
                    "beside the held-out data (floor) and a fitted Gaussian (bar).",
        epilog=_examples("pygen eval runs/flow --data digits", "pygen eval samples/flow --data digits --json eval.json"))
    s.add_argument("source", metavar="CHECKPOINT|SAMPLES_DIR")
    s.add_argument("--data", required=True, metavar="SPEC")
    s.add_argument("--image-size", type=_int_at_least(4), metavar="N",
                   help="an image folder resized as for training (default: the run's train.json)")
    s.add_argument("--n", type=_int_at_least(2), help="samples compared (default: the test split's size)")
    s.add_argument("--seed", type=_int_at_least(0), default=0)
    s.add_argument("--json", metavar="FILE", help="write the results as JSON")
    s.add_argument("--no-ema", action="store_true", help="a checkpoint's raw weights instead of the EMA ones")
    s.add_argument("--checkpoint", dest="which", metavar="best|latest|STEP",
                   help="a training directory's checkpoint (default: best.pt when the run kept one, else latest)")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser(
        "bench", help="kernel benchmark tables (time, GB/s, vs torch eager / compile / diffusers)",
        formatter_class=_fmt(),
        description="Run the benchmark suites of benchmarks/ (pytest-benchmark on CPU, gpu_bench.py on CUDA) "
                    "and print their tables. The full CPU suites take ~12 minutes on 2 cores.",
        epilog=_examples("pygen bench --suite schedulers", "pygen bench --suite gaussian --quick --json g.json",
                         "pygen bench --device cuda --json gpu.json"))
    s.add_argument("--suite", choices=SUITES, help="one suite (default all)")
    s.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    s.add_argument("--quick", action="store_true",
                   help="small sizes, few rounds (PYGEN_BENCH_QUICK=1): a smoke run. The suites also read "
                        "PYGEN_BENCH_SIZES and PYGEN_BENCH_PROVIDERS (e.g. pygen-cpp,eager: no torch.compile)")
    s.add_argument("--json", metavar="FILE", help="write every suite's results as JSON")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser(
        "demo", help="train VAE, GAN, flow, diffusion on the digits; sample, evaluate, write a report",
        formatter_class=_fmt(),
        description="Train small VAE, GAN, flow and diffusion models on the bundled digits (~10 minutes on "
                    "2 CPU cores; --quick ~1-2 minutes), sample each with pygen sample's job, evaluate "
                    "them, and write DIR/report.md with sample grids, training curves and the metrics table. "
                    "--kernels runs the kernel-throughput demo instead.",
        epilog=_examples("pygen demo", "pygen demo --quick --out /tmp/demo",
                         "pygen demo --data fashion-mnist --threads 2", "pygen demo --kernels"))
    s.add_argument("--out", default="pygen-demo", metavar="DIR", help="(default ./pygen-demo)")
    s.add_argument("--quick", action="store_true", help="a short run (numbers not meaningful)")
    s.add_argument("--families", nargs="+", choices=("vae", "gan", "flow", "diffusion"), help="(default all)")
    s.add_argument("--threads", type=int, default=1, help="torch threads (default 1: tiny models)")
    s.add_argument("--data", default="digits", metavar="SPEC",
                   help="the data (default digits); e.g. fashion-mnist: each family's defaults cut to --minutes")
    s.add_argument("--minutes", type=float, help="per family, data other than digits (default 5, --quick 1)")
    s.add_argument("--kernels", action="store_true", help="the fused-kernel throughput demo")
    s.add_argument("--device", help="--kernels: cpu or cuda")
    s.set_defaults(fn=cmd_demo)
    return p


def _version() -> str:
    try:
        from importlib.metadata import version

        return f"pygen {version('pygen')}"
    except Exception:  # noqa: BLE001
        return "pygen"


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: temp files are removed, nothing half-written stays


def main(argv: list[str] | None = None) -> int:
    # when the command started (after Python's and torch's imports): --minutes and the default
    # cap count its data loading and model building too
    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    args.started = started
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        pass
    import warnings

    from pygen._io import CorruptCheckpoint
    from pygen._lock import DirectoryBusy
    from pygen.data import DataError
    from pygen.sampling import SamplingError

    default_format, ours = warnings.formatwarning, str(Path(__file__).resolve().parents[1])

    def one_line(message: Any, category: type[Warning], filename: str, lineno: int, line: str | None = None) -> str:
        if not str(Path(filename).resolve()).startswith(ours):  # torch's and the others' as usual
            return default_format(message, category, filename, lineno, line)
        return f"pygen {args.command}: warning: {message}\n"

    warnings.formatwarning = one_line  # pygen's own: what a user reads, not our source lines
    try:
        return int(args.fn(args) or 0)
    except (UserError, DataError, SamplingError, DirectoryBusy, CorruptCheckpoint) as e:
        print(f"pygen {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER
    except FileNotFoundError as e:
        print(f"pygen {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print(f"pygen {args.command}: interrupted; complete files are kept: run the same command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPT
