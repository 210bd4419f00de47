"""Fused sweeps against the basic and joblib launchers, measured side by side in one sitting.

    python scripts/benchmark_fused.py                 # everything below (about 15 minutes on 2 cores)
    python scripts/benchmark_fused.py --no-epochs     # without the 3-epoch sweeps
    python scripts/benchmark_fused.py --device cuda --repeats 1 --epochs 1   # on a GPU (gpu_check.sh)

Measures, with the seed VAE's net (MLP 784-256-latent, batch 128; --hidden 512,256 for the
default VAE's), pictures and checkpoints on:
  - a 16-job latent_dim x beta sweep of 5-batch jobs with each launcher (medians of
    --repeats runs, interleaved) and of 3-epoch jobs (once each): whole `genlab-train -m`
    commands, wall time;
  - the compute floor of a training step: one model's step in a plain loop (loss, backward,
    Adam), sixteen such steps one after another, and one step of the 16 models fused;
  - memory per fused member: the peak resident memory of a process training a fused group of
    1, 16 and 64 members (on a GPU: the peak of GPU memory allocated);
  - on a GPU, an epoch of a fused group of 1, 16 and 64 members (the step alone, no logging).
On a GPU the joblib launcher is left out (one GPU), and the sweeps use trainer=gpu.
Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_sweep import GRID, SHORT, THREE_EPOCHS, sweep_seconds

LAUNCHERS = ("basic", "joblib", "fused")


def _members(net: list[str], n: int) -> list:
    """``n`` VAEs of the sweep's grid (latent_dim 2..16, beta 0.5..4), built as a run builds them."""
    from hydra.utils import instantiate

    from genlab.config import compose_config

    grid = [(latent, beta) for latent in (2, 4, 8, 16) for beta in (0.5, 1, 2, 4)]
    return [
        instantiate(
            compose_config(
                [*net, f"model.latent_dim={grid[i % 16][0]}", f"model.beta={grid[i % 16][1]}"]
            ).model
        )
        for i in range(n)
    ]


def step_floor(net: list[str], device: str, rounds: int = 5, steps: int = 10) -> dict[str, float]:
    """Milliseconds per training step (median over ``rounds``): one model alone, sixteen
    one after another, and the sixteen fused."""
    import torch

    from genlab.fused.model import FusedModel

    models = [m.to(device) for m in _members(net, 16)]
    x = torch.rand(128, 1, 28, 28, device=device)
    apart = [torch.optim.Adam(m.parameters(), lr=1e-3, fused=True) for m in models]

    def one_step(model, optimizer) -> None:
        eps = torch.randn(model.noise_shape(128), device=device)
        loss = model.loss_terms(x, eps, model.beta)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()  # the one read per step a training loop makes

    fused = FusedModel(models, [0] * 16, [0] * 16).to(device)
    together = torch.optim.Adam(fused.parameters(), lr=1e-3, fused=True)
    betas = torch.tensor([m.beta for m in models], device=device)

    def fused_step() -> None:
        eps = torch.randn(16, 128, 1, 16, device=device)
        values = fused._metrics(x, None, eps, betas)
        together.zero_grad()
        values[:, 0].sum().backward()
        together.step()
        values.tolist()

    def timed(work) -> float:
        work()  # warm-up
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(steps):
                work()
            times.append((time.perf_counter() - start) / steps * 1000)
        return statistics.median(times)

    return {
        "one model": timed(lambda: one_step(models[15], apart[15])),
        "16 models, one after another": timed(
            lambda: [one_step(m, o) for m, o in zip(models, apart)]
        ),
        "16 models fused": timed(fused_step),
    }


_MEMORY = """
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
from benchmark_fused import fused_epoch_seconds
n, device, net = int(sys.argv[2]), sys.argv[3], sys.argv[4:]
fused_epoch_seconds(n, net, device, steps=3)
if device == "cpu":
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux
else:
    print(torch.cuda.max_memory_allocated() / 2**20)
"""


def fused_epoch_seconds(n: int, net: list[str], device: str, steps: int | None = None) -> float:
    """Seconds of an epoch (or of ``steps`` steps) of a fused group of ``n`` members over
    MNIST's 55,000 training images in batches of 128: gather, noise, loss, backward, Adam,
    and the step's one read of the metrics."""
    import torch

    from genlab.fused.model import FusedModel

    fused = FusedModel(_members(net, n), [0] * n, [0] * n).to(device)
    optimizer = torch.optim.Adam(fused.parameters(), lr=1e-3, fused=True)
    images = torch.rand(55_000, 1, 28, 28, device=device)
    betas = torch.ones(n, device=device)
    batches = steps or len(images) // 128
    start = time.perf_counter()
    for step in range(batches):
        x = images[step * 128 : (step + 1) * 128]
        eps = torch.randn(n, 128, 1, fused.padded_dim, device=device)
        values = fused._metrics(x, None, eps, betas)
        optimizer.zero_grad()
        values[:, 0].sum().backward()
        optimizer.step()
        values.tolist()
    return time.perf_counter() - start


def peak_memory_mb(members: int, net: list[str], device: str) -> float:
    """Peak memory (MB) of a process training a fused group of ``members``: resident memory
    on a CPU, GPU memory allocated on a GPU."""
    here = str(Path(__file__).resolve().parent)
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY, here, str(members), device, *net],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(done.stdout.split()[-1])


def print_agreement(fused: Path, basic: Path) -> None:
    """How far each fused job's test metrics are from the same job's under the basic launcher."""
    import json

    worst: dict[str, float] = {}
    for job in sorted(p.name for p in basic.iterdir() if p.name.isdigit()):
        a = json.loads((fused / job / "metrics.json").read_text())
        b = json.loads((basic / job / "metrics.json").read_text())
        for key in (k for k in b if k.startswith("test/")):
            worst[key] = max(worst.get(key, 0.0), abs(a[key] - b[key]) / abs(b[key]))
    print(
        "\nFused against basic after the long sweeps, largest relative difference over the jobs:\n"
    )
    print("| metric | largest relative difference |")
    print("|---|---|")
    for key, value in worst.items():
        print(f"| {key} | {value:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-epochs", action="store_true", help="skip the 3-epoch sweeps")
    parser.add_argument("--hidden", default="256", help="the MLP's hidden widths (default: 256)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the long sweeps")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    net = [f"model.net.hidden_dims=[{args.hidden}]"]
    gpu = args.device == "cuda"
    launchers = ("basic", "fused") if gpu else LAUNCHERS
    trainer = ["trainer=gpu"] if gpu else []
    folder = Path(tempfile.mkdtemp(prefix="genlab-fused-bench-"))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if gpu:
        import torch

        machine += f", {torch.cuda.get_device_name(0)}"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"Machine: {machine}; {when}; VAE with {net[0]}.\n")
    short: dict[str, list[float]] = {launcher: [] for launcher in launchers}
    for _ in range(args.repeats):  # interleaved, so that drift of the machine hits all alike
        for launcher in launchers:
            command = [*GRID, *net, *trainer, *SHORT, f"hydra/launcher={launcher}"]
            short[launcher].append(sweep_seconds(None, command, folder / launcher))
    basic = statistics.median(short["basic"])
    print(f"16 jobs of 5 training batches (medians of {args.repeats}, interleaved):\n")
    print("| launcher | 16-job sweep (s) | against basic |")
    print("|---|---|---|")
    for launcher in launchers:
        seconds = statistics.median(short[launcher])
        print(f"| {launcher} | {seconds:.1f} | {seconds / basic:.2f}x |")
    if not args.no_epochs:
        print(f"\n16 jobs of {args.epochs} epochs (one run each):\n")
        print("| launcher | 16-job sweep (s) | against basic |")
        print("|---|---|---|")
        long = [f"trainer.max_epochs={args.epochs}", *THREE_EPOCHS[1:]]
        epochs = {
            launcher: sweep_seconds(
                None,
                [*GRID, *net, *trainer, *long, f"hydra/launcher={launcher}"],
                folder / launcher,
            )
            for launcher in launchers
        }
        for launcher, seconds in epochs.items():
            print(f"| {launcher} | {seconds:.0f} | {seconds / epochs['basic']:.2f}x |")
        print_agreement(folder / "fused", folder / "basic")
    print("\nOne training step, batch 128 (ms; medians of 5 rounds of 10 steps):\n")
    print("| what | ms per step | per model |")
    print("|---|---|---|")
    for what, ms in step_floor(net, args.device).items():
        per = ms / (1 if what == "one model" else 16)
        print(f"| {what} | {ms:.1f} | {per:.1f} |")
    sizes = (1, 16, 64)
    peaks = {n: peak_memory_mb(n, net, args.device) for n in sizes}
    print("\nPeak memory of a fused group (batch 128, Adam):\n")
    print(f"| members | peak {'GPU memory allocated' if gpu else 'resident memory'} (MB) |")
    print("|---|---|")
    for n, mb in peaks.items():
        print(f"| {n} | {mb:.0f} |")
    per_member = (peaks[64] - peaks[1]) / 63
    print(f"\nEach further member: {per_member:.1f} MB, about {1024 / per_member:.0f} per GB.")
    if gpu:  # on two CPU cores 64 members take minutes an epoch: only where it is quick
        seconds = {n: fused_epoch_seconds(n, net, args.device) for n in sizes}
        print("\nAn epoch of a fused group, the step alone (s):\n")
        print("| members | epoch (s) | against one member |")
        print("|---|---|---|")
        for n, value in seconds.items():
            print(f"| {n} | {value:.2f} | {value / seconds[1]:.2f}x |")


if __name__ == "__main__":
    main()
