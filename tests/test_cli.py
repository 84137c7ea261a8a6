"""The ``pygen`` command line, driven as a user would (subprocesses of ``python -m pygen``):
help, info, train + resume + sample + eval for each family on tiny settings, Ctrl-C, the
demo, the benchmark wrapper, and every user mistake (one line on stderr, exit status 2, no
traceback). The sampling job's own guarantees are in test_sampling.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pygen.models as models

REPO = Path(__file__).resolve().parents[1]
TINY = {  # family -> train arguments of a model that trains in a second or two
    "vae": ["--hidden", "32", "--latent-dim", "4"],
    "gan": ["--width", "8", "--z-dim", "8", "--option", "g_hidden=32", "--option", "d_hidden=32"],
    "flow": ["--hidden", "8", "--depth", "1"],
}
TINY_DIFFUSION = ["--option", "width=8", "--option", "mults=[1]", "--option", "blocks=1", "--option", "attention=false"]


def env(**extra: str) -> dict[str, str]:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}
    e.pop("TRITON_INTERPRET", None)  # CPU kernels in the children, not the (slow) Triton interpreter
    return e


def cli(*args: str, check: bool = True, cwd: Path = REPO, timeout: float = 180,
        extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "pygen", *map(str, args)], cwd=cwd, env=env(**(extra_env or {})),
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cli") / "vae"
    cli("train", "vae", "--data", "digits", "--out", run, "--steps", "20", "--batch-size", "32",
          "--no-progress", *TINY["vae"])
    return run


# ---- help and info ------------------------------------------------------------------------


def test_help_on_every_command(capsys):
    from pygen.cli import main

    for cmd in ([], ["info"], ["train"], ["sample"], ["eval"], ["bench"], ["demo"]):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "examples:" in out and "pygen" in out, cmd
    proc = cli("--help")  # python -m pygen works
    assert "train" in proc.stdout and "sample" in proc.stdout


def test_info():
    out = cli("info").stdout
    assert "pygen 0.1.0" in out and "torch" in out and "backends:" in out
    for backend in ("torch", "cpp", "cuda", "triton"):
        assert f"  {backend}" in out
    assert "usable" in out


# ---- train, resume, sample, eval ------------------------------------------------------------


def test_train_resume_sample_eval(vae_run, tmp_path):
    saved = json.loads((vae_run / "train.json").read_text())
    assert saved["family"] == "vae" and saved["steps"] == 20 and saved["options"]["hidden"] == 32
    assert (vae_run / "latest").read_text().strip() == "ckpt-20.pt"
    # --resume takes data, options and batch size from train.json; a larger --steps continues
    run = tmp_path / "vae"
    import shutil

    shutil.copytree(vae_run, run)
    cli("train", "vae", "--out", run, "--resume", "--steps", "30", "--no-progress")
    assert (run / "latest").read_text().strip() == "ckpt-30.pt"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 30

    samples = tmp_path / "samples"
    out = cli("sample", run, "-n", "400", "--out", samples, "--batch-size", "128", "--no-progress").stdout
    assert "400 samples of vae" in out and (samples / "grid.png").exists()
    res = tmp_path / "eval.json"
    table = cli("eval", samples, "--data", "digits", "--json", res).stdout
    assert "| fd |" in table and "Gaussian (bar)" in table
    from_dir = json.loads(res.read_text())
    assert from_dir["meta"]["n"] == 355 and from_dir["fd"] > 0
    # the checkpoint itself: the same samples (seed 0, indices 0..354), plus its likelihood
    res2 = tmp_path / "eval2.json"
    cli("eval", run, "--data", "digits", "--json", res2)
    from_ckpt = json.loads(res2.read_text())
    assert from_ckpt["fd"] == pytest.approx(from_dir["fd"], rel=1e-4)
    assert "nll" in from_ckpt


@pytest.mark.parametrize("family", ["gan", "flow"])
def test_train_and_sample_family(family, tmp_path):
    run = tmp_path / family
    cli("train", family, "--data", "digits", "--out", run, "--steps", "6", "--batch-size", "16",
          "--no-progress", "--log-every", "3", *TINY[family])
    cli("sample", run, "-n", "40", "--out", tmp_path / "s", "--batch-size", "16", "--no-progress")
    assert (tmp_path / "s" / "grid.png").exists()


def test_train_config_file_and_conditional(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"steps": 4, "batch_size": 16, "model": {"hidden": 16, "latent_dim": 2}}))
    run = tmp_path / "cvae"
    cli("train", "vae", "--data", "digits", "--out", run, "--config", cfg, "--conditional", "--no-progress")
    model = models.load(run)
    assert model.config["hidden"] == 16 and model.config["num_classes"] == 10
    assert (run / "latest").read_text().strip() == "ckpt-4.pt"
    cli("sample", run, "-n", "20", "--out", tmp_path / "s", "--labels", "cycle", "--no-progress")
    cli("sample", run, "-n", "20", "--out", tmp_path / "s3", "--labels", "3", "--no-progress")


def test_a_gan_on_labelled_28x28_images_is_class_conditional_unless_unconditional(tmp_path):
    """The rule measured on Fashion-MNIST (FD 4.85 -> 2.42), and its opt-out; resume keeps either."""
    import numpy as np

    rng = np.random.default_rng(0)
    data = tmp_path / "fm.npz"
    np.savez(data, images=rng.integers(0, 256, (24, 28, 28), dtype=np.uint8), labels=np.arange(24) % 3)
    for flags, classes in (([], 3), (["--unconditional"], None)):
        run = tmp_path / f"gan{len(flags)}"
        cli("train", "gan", "--data", data, "--out", run, "--steps", "1", "--batch-size", "8", "--no-progress",
            *TINY["gan"], *flags)
        assert models.load(run).config["num_classes"] == classes
        cli("train", "gan", "--out", run, "--resume", "--steps", "2", "--no-progress")
        assert models.load(run).config["num_classes"] == classes
        assert (run / "latest").read_text().strip() == "ckpt-2.pt"
    cli("sample", tmp_path / "gan0", "-n", "6", "--out", tmp_path / "s", "--labels", "cycle", "--no-progress")


@pytest.mark.skipif(not hasattr(models, "Diffusion"), reason="pygen.models.Diffusion not there yet")
def test_diffusion(tmp_path):
    run = tmp_path / "ddpm"
    cli("train", "diffusion", "--data", "digits", "--out", run, "--steps", "3", "--batch-size", "16",
          "--no-progress", *TINY_DIFFUSION)
    assert models.load(run).config["num_classes"] == 10  # labelled data: class-conditional
    args = ["-n", "12", "--batch-size", "5", "--steps", "2", "--labels", "cycle", "--guidance", "2", "--no-progress"]
    cli("sample", run, "--out", tmp_path / "s", *args)
    cli("sample", run, "--out", tmp_path / "s2", *args[:2], "--batch-size", "12", *args[4:])
    from pygen.sampling import SampleDir

    a, b = SampleDir(tmp_path / "s").read(0, 12), SampleDir(tmp_path / "s2").read(0, 12)
    assert (a - b).abs().max() < 1e-4  # batch-size invariant through the sampler loop too
    assert_user_error(cli("sample", run, "-n", "4", "--out", tmp_path / "s3", "--sampler", "nosuch", check=False),
                      "nosuch")
    assert not (tmp_path / "s3").exists()


@pytest.mark.skipif(not hasattr(models, "SuperResolution"), reason="pygen.models.SuperResolution not there yet")
def test_super_resolution_needs_its_inputs(tmp_path):
    run = tmp_path / "sr"
    cli("train", "sr", "--data", "patches", "--out", run, "--steps", "2", "--batch-size", "4",
          "--no-progress", *TINY_DIFFUSION)
    assert_user_error(cli("sample", run, "-n", "3", "--out", tmp_path / "x", check=False), "--data")
    cli("sample", run, "-n", "3", "--out", tmp_path / "s", "--data", "patches", "--steps", "2", "--no-progress")
    assert (tmp_path / "s" / "grid.png").exists()


# ---- Ctrl-C ---------------------------------------------------------------------------------


def test_ctrl_c_leaves_no_partial_file(vae_run, tmp_path):
    out = tmp_path / "s"
    # `pygen sample` with the job slowed down after each shard (a callback of sample_to_dir), so
    # that Ctrl-C arrives mid-way
    args = ["sample", str(vae_run), "-n", "2000", "--out", str(out), "--shard-size", "100", "--no-progress"]
    # the default Ctrl-C handler, as in a terminal: a runner started in the background by a
    # non-interactive shell (`cmd &`) ignores SIGINT, and children inherit that
    script = ("import functools, signal, time, pygen.sampling as s\n"
              "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
              "s.sample_to_dir = functools.partial(s.sample_to_dir, on_shard=lambda a, b: time.sleep(1.0))\n"
              f"from pygen.cli import main\nraise SystemExit(main({args!r}))")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env(), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(out.glob("shard-*.npz")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "resume" in err and "Traceback" not in err
    assert not list(out.glob(".tmp-*"))
    import numpy as np

    for f in out.glob("shard-*.npz"):
        with np.load(f) as z:
            assert len(z["index"]) == 100


# ---- user mistakes ----------------------------------------------------------------------------


def run_main(args: list, capsys) -> tuple[int, str]:
    """``pygen.cli.main`` in this process (for mistakes caught before any real work)."""
    from pygen.cli import main

    old = signal.getsignal(signal.SIGTERM)
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse
        rc = e.code
    finally:
        signal.signal(signal.SIGTERM, old)
    return rc, capsys.readouterr().err


def test_user_mistakes_caught_early(vae_run, tmp_path, capsys):
    cases = [
        (["sample", tmp_path / "missing", "-n", "5", "--out", tmp_path / "o1"], ["missing"]),
        (["sample", vae_run, "-n", "0", "--out", tmp_path / "o2"], ["-n must be a positive integer"]),
        (["sample", vae_run, "-n", "-3", "--out", tmp_path / "o3"], ["-n must be a positive integer"]),
        (["sample", tmp_path, "-n", "5", "--out", tmp_path / "o6"], ["holds no checkpoint"]),
        (["sample", vae_run, "--out", tmp_path / "o7"], ["-n"]),  # argparse: a required option
        (["train", "nosuchfamily", "--data", "digits", "--out", tmp_path / "t1"], ["invalid choice"]),
        (["train", "vae", "--data", "digits", "--out", tmp_path / "t5", "--config", tmp_path / "no.json"], ["no.json"]),
        (["train", "vae", "--data", "digits", "--out", tmp_path / "t6", "--steps", "0"], ["--steps"]),
        (["train", "vae", "--data", "digits", "--out", tmp_path / "t7", "--depth", "3"], ["--depth", "flow"]),
        (["eval", tmp_path / "missing", "--data", "digits"], ["missing"]),
        (["sample", vae_run, "-n", "5", "--out", tmp_path / "o8", "--device", "nonsense"], ["--device"]),
    ]
    if not torch.cuda.is_available():
        cases.append((["train", "vae", "--data", "digits", "--out", tmp_path / "t8", "--device", "cuda"], ["CUDA"]))
    for args, needles in cases:
        rc, err = run_main(args, capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1, (args, rc, err)
        for needle in needles:
            assert needle in lines[0], (args, lines[0])
    assert not (tmp_path / "t1").exists() and not (tmp_path / "o1").exists() and not (tmp_path / "t6").exists()


def test_missing_fashion_mnist_is_one_line(tmp_path, capsys, monkeypatch):
    import pygen.data.files

    monkeypatch.setattr(pygen.data.files, "FASHION_MNIST_DIR", tmp_path / "absent")
    monkeypatch.delenv("PYGEN_DATA", raising=False)
    rc, err = run_main(["train", "vae", "--data", "fashion-mnist", "--out", tmp_path / "r"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "apt install dataset-fashion-mnist" in err, err
    assert not (tmp_path / "r").exists()


def test_user_mistakes(vae_run, tmp_path):
    """Mistakes found while loading data or a checkpoint: one line, exit 2, no traceback."""
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    s = ["--no-progress"]
    cases = [
        (["sample", vae_run, "-n", "5", "--out", foreign, *s], ["not empty"]),
        (["sample", vae_run, "-n", "5", "--out", a_file / "sub", *s], ["cannot create"]),
        (["sample", vae_run, "-n", "5", "--out", tmp_path / "o4", "--labels", "3"], ["class-conditional"]),
        (["sample", vae_run, "-n", "5", "--out", tmp_path / "o5", "--sampler", "ddim"], ["--sampler"]),
        (["train", "vae", "--data", tmp_path / "nothing.npz", "--out", tmp_path / "t2"], ["nothing.npz"]),
        (["train", "vae", "--data", a_file, "--out", tmp_path / "t3"], ["file.txt"]),
        (["train", "vae", "--data", "digits", "--out", vae_run], ["already holds a training run", "--resume"]),
        (["train", "vae", "--data", "digits", "--out", tmp_path / "t4", "--option", "nosuch=1"], ["nosuch"]),
        (["train", "gan", "--out", vae_run, "--resume"], ["'vae' run"]),
        (["eval", vae_run, "--data", "no_such_data"], ["no_such_data"]),
    ]
    for args, needles in cases:
        assert_user_error(cli(*args, check=False), *needles)
    assert not (tmp_path / "o4").exists() and not (tmp_path / "o5").exists()


# ---- demo and bench ---------------------------------------------------------------------------


def test_demo_quick_one_family(tmp_path):
    out = cli("demo", "--quick", "--families", "vae", "--out", tmp_path / "demo").stdout
    report = tmp_path / "demo" / "quick" / "report.md"
    assert f"report: {report}" in out
    text = report.read_text()
    assert "| vae |" in text and "fitted Gaussian (bar)" in text and "samples/vae/grid.png" in text
    assert (tmp_path / "demo" / "quick" / "samples" / "vae" / "grid.png").exists()
    assert (tmp_path / "demo" / "quick" / "curves" / "vae.png").exists()
    assert json.loads((tmp_path / "demo" / "quick" / "report.json").read_text())["results"]["vae"]["evaluate"]["fd"] > 0


@pytest.mark.usefixtures("fashion_mnist")
def test_demo_on_fashion_mnist_cuts_steps_to_the_budget_and_trains_diffusion_in_latent_space(tmp_path):
    cli("demo", "--quick", "--families", "diffusion", "--data", "fashion-mnist", "--minutes", "0.25", "--threads", "2",
        "--out", tmp_path / "demo", timeout=600)
    res = json.loads((tmp_path / "demo" / "fashion-mnist-quick" / "report.json").read_text())["results"]["diffusion"]
    assert res["family"] == "latent-diffusion" and res["data"] == "fashion-mnist" and res["shape"] == [1, 28, 28]
    assert 1 <= res["steps"] < res["default_steps"]  # cut to a quarter of a minute
    assert 1 <= res["config"]["ae_steps"] <= res["steps"] // 2  # both stages trained
    assert res["evaluate"]["fd"] > 0
    report = (tmp_path / "demo" / "fashion-mnist-quick" / "report.md").read_text()
    assert "pygen train latent-diffusion --data fashion-mnist" in report


def test_bench_quick(tmp_path):
    pytest.importorskip("pytest_benchmark")
    res = tmp_path / "bench.json"
    # one size, no torch.compile provider (its compilation is most of the suite's time)
    out = cli("bench", "--suite", "gaussian", "--quick", "--json", res, timeout=300,
              extra_env={"PYGEN_BENCH_SIZES": "1e4", "PYGEN_BENCH_PROVIDERS": "pygen-cpp,eager"}).stdout
    assert "| op |" in out and "GB/s" in out
    assert json.loads(res.read_text())["suites"]["gaussian"]["benchmarks"]


def test_torchrun_train(tmp_path):
    """``torchrun -m pygen train``: data-parallel on 2 CPU ranks (gloo), rank 0 writes."""
    run = tmp_path / "vae"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m", "pygen",
           "train", "vae", "--data", "digits", "--out", str(run), "--steps", "4", "--batch-size", "16",
           "--no-progress", "--device", "cpu", *TINY["vae"]]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("training vae") == 1  # rank 0 reports
    ckpt = torch.load(run / "ckpt-4.pt", weights_only=True)
    assert ckpt["train"]["world_size"] == 2 and len(ckpt["rng"]) == 2
