"""GPU check: run each paper-scale code path on random weights at paper shapes for a few seconds.

    python -m repro.gpu_check                 # on a GPU machine (nox -s gpu_check)
    python -m repro.gpu_check --device cpu --quick   # the same checks on tiny shapes (used by the tests)

Each check runs the real code (EDM networks at the released checkpoints' shapes, with and without fp16
autocast; the Heun and Restart samplers; the offline Inception; FISTA at the benchmark's size; a torchrun
smoke run with NCCL), verifies the outputs (finite, right shapes, NFE equal to the analytic count) and
prints timings. Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeat: int = 3) -> tuple[object, float]:
    out = fn()  # warm-up (cuDNN autotune, lazy init)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    _sync(device)
    return out, (time.perf_counter() - start) / repeat


def check_network(name: str, class_name: str, kwargs: dict, batch: int, device: torch.device, fp16: bool) -> str:
    """fp16 goes through the networks' own ``use_fp16`` path, as in EDM's released ImageNet model (the
    preconditioning stays in fp32); on CPU fp16 convolutions are not supported, so it runs in fp32."""
    from repro.restart.networks import build_network, count_parameters

    fp16 = fp16 and device.type == "cuda"
    net = build_network(class_name, {**kwargs, "use_fp16": fp16}).to(device).eval()
    res, ch = kwargs["img_resolution"], kwargs["img_channels"]
    x = torch.randn(batch, ch, res, res, device=device) * 10
    sigma = torch.full((batch,), 10.0, device=device)
    labels = None
    if kwargs.get("label_dim"):
        labels = torch.nn.functional.one_hot(torch.arange(batch, device=device) % kwargs["label_dim"], kwargs["label_dim"]).float()

    def forward():
        with torch.no_grad():
            return net(x, sigma, labels)

    out, seconds = _timed(forward, device)
    assert out.shape == x.shape, f"output shape {tuple(out.shape)} != {tuple(x.shape)}"
    assert torch.isfinite(out).all(), "non-finite output"
    return f"{name}: {count_parameters(net) / 1e6:.1f}M params, batch {batch}, {'fp16' if fp16 else 'fp32'}: {seconds * 1e3:.1f} ms/forward ({batch / seconds:.0f} img/s per NFE)"


def check_samplers(class_name: str, kwargs: dict, batch: int, device: torch.device) -> str:
    from repro.restart.networks import build_network
    from repro.restart.samplers import CountingDenoiser, NoiseSource, edm_sigmas, restart_nfe, sample_heun, sample_restart

    net = build_network(class_name, kwargs).to(device).eval()
    res, ch = kwargs["img_resolution"], kwargs["img_channels"]
    noise = NoiseSource(list(range(batch)), device)
    x0 = noise.randn_like(torch.empty(batch, ch, res, res, device=device, dtype=torch.float64)) * 80.0
    timings = []
    for label, run, expected in (
        ("Heun 18 steps", lambda d: sample_heun(d, x0.clone(), edm_sigmas(18, device=device)), 35),
        ("Restart (VP, NFE 43)", lambda d: sample_restart(d, x0.clone(), edm_sigmas(18, device=device), noise=NoiseSource(list(range(batch)), device), restart=[[3, 2, 0.06, 0.30]]), restart_nfe(18, [[3, 2, 0.06, 0.30]])),
    ):
        counter = CountingDenoiser(lambda x, s, class_labels=None: net(x.float(), s, class_labels).double() if torch.is_tensor(s) else net(x.float(), torch.full((x.shape[0],), float(s), device=device), class_labels).double())
        start = time.perf_counter()
        with torch.no_grad():
            out = run(counter)
        _sync(device)
        took = time.perf_counter() - start
        assert counter.nfe == expected, f"{label}: counted NFE {counter.nfe} != {expected}"
        assert torch.isfinite(out).all(), f"{label}: non-finite samples"
        timings.append(f"{label} NFE {counter.nfe}: {took:.2f} s for {batch} images")
    return "; ".join(timings)


def check_inception(device: torch.device, batch: int) -> str:
    from repro.metrics.image_metrics import extract

    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    feats, seconds = _timed(lambda: extract(images, "inception-fid-helper", device=device), device, repeat=2)
    pool = feats["pool"]
    assert pool.shape == (batch, 2048) and (pool == pool).all(), f"bad features {pool.shape}"
    return f"offline Inception: {batch} images in {seconds:.2f} s ({batch / seconds:.0f} img/s)"


def check_fista(device: torch.device, n: int, d: int, m: int, iters: int) -> str:
    from repro.sparsity.fista import fista

    g = torch.Generator(device="cpu").manual_seed(0)
    D = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1).to(device)
    X = torch.randn(n, d, generator=g).to(device)
    result, seconds = _timed(lambda: fista(X, D, lam=0.1, n_iter=iters, tol=0.0), device, repeat=1)
    assert torch.isfinite(result.codes).all()
    flops = result.n_iter * 2 * (2.0 * n * m * d)  # two matmuls per iteration
    return f"FISTA n={n} d={d} atoms={m}: {result.n_iter} iterations in {seconds:.2f} s ({flops / seconds / 1e9:.0f} GFLOP/s)"


def check_torchrun(device: torch.device) -> str:
    """A smoke table through torchrun: NCCL on GPUs (one rank per GPU), gloo on CPU."""
    root = Path(__file__).resolve().parent.parent
    nproc = max(1, min(2, torch.cuda.device_count())) if device.type == "cuda" else 2
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0",
               "-m", "repro", "run", "restart.toy", "--scale", "smoke", "--results", tmp, "--no-progress", "--only", "seed=0", "--device", device.type]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
        took = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
    backend = "NCCL" if device.type == "cuda" else "gloo"
    return f"torchrun {nproc} process(es) with {backend}: restart.toy smoke (seed 0) in {took:.1f} s"


def check_smoke_on_device(device: torch.device, table: str, only: str | None = None) -> str:
    """A smoke table (tiny random networks, the paper code path) run on ``device``; reports the largest relative
    metric difference from the committed CPU baselines (informative: GPU kernels round differently)."""
    import json

    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "repro", "run", table, "--scale", "smoke", "--results", tmp, "--no-progress", "--device", device.type]
        if only:
            cmd += ["--only", only]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900)
        took = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        worst, n = 0.0, 0
        for path in Path(tmp, table, "smoke").glob("*.json"):
            record = json.loads(path.read_text())
            if record["status"] != "ok":
                raise RuntimeError(f"{path.name}: {record['error']}")
            baseline = root / "results" / table / "smoke" / path.name
            if baseline.is_file():
                base = json.loads(baseline.read_text())["metrics"] or {}
                for key, value in record["metrics"].items():
                    if key in base and base[key]:
                        worst = max(worst, abs(value - base[key]) / abs(base[key]))
                        n += 1
    return f"{table} smoke{' (' + only + ')' if only else ''} on {device.type} in {took:.1f} s; max relative difference from the CPU baselines over {n} metrics: {worst:.2e}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (for CPU tests)")
    parser.add_argument("--skip", nargs="*", default=[], help="checks to skip by name")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; use --device cpu --quick for a CPU dry run", file=sys.stderr)
        return 2
    from repro.restart.networks import cifar10_ddpmpp_kwargs, imagenet64_adm_kwargs, tiny_precond_kwargs

    if args.quick:
        cifar = ("VPPrecond", tiny_precond_kwargs("VPPrecond", "SongUNet", img_resolution=32))
        imnet = ("EDMPrecond", tiny_precond_kwargs("EDMPrecond", "DhariwalUNet", img_resolution=64, label_dim=10))
        batches, fista_shape = (2, 2, 4), (256, 64, 128, 20)
    else:
        cifar = ("VPPrecond", cifar10_ddpmpp_kwargs())
        imnet = ("EDMPrecond", {**imagenet64_adm_kwargs(), "use_fp16": False})
        batches, fista_shape = (128, 64, 256), (4096, 512, 2048, 200)
    checks = {
        "cifar10_fp32": lambda: check_network("CIFAR-10 DDPM++ (VPPrecond/SongUNet)", *cifar, batches[0], device, fp16=False),
        "cifar10_fp16": lambda: check_network("CIFAR-10 DDPM++ (VPPrecond/SongUNet)", *cifar, batches[0], device, fp16=True),
        "imagenet64_fp16": lambda: check_network("ImageNet-64 ADM (EDMPrecond/DhariwalUNet)", *imnet, batches[1], device, fp16=True),
        "samplers": lambda: check_samplers(*cifar, batches[1] if not args.quick else 2, device),
        "inception": lambda: check_inception(device, batches[2]),
        "fista": lambda: check_fista(device, *fista_shape),
        "torchrun": lambda: check_torchrun(device),
        "pfgmpp_smoke": lambda: check_smoke_on_device(device, "restart.table3", only="pfgmpp"),
        "sd_smoke": lambda: check_smoke_on_device(device, "restart.sd"),
    }
    if os.environ.get("REPRO_GPU_CHECK_SKIP"):
        args.skip += os.environ["REPRO_GPU_CHECK_SKIP"].split(",")
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    failures = 0
    for name, check in checks.items():
        if name in args.skip:
            print(f"SKIP {name}")
            continue
        try:
            print(f"ok   {name}: {check()}", flush=True)
        except Exception:
            failures += 1
            print(f"FAIL {name}:\n{traceback.format_exc()}", flush=True)
    print(f"{len(checks) - len(args.skip) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
