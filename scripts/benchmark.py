"""Training speed of genlab against plain PyTorch loops on the same model; writes BENCHMARKS.md.

    python scripts/benchmark.py                 # the main table (about 10 minutes on 2 CPU cores)
    python scripts/benchmark.py --scaling       # plus epoch time against batch size and width
    python scripts/benchmark.py --options       # plus genlab with model.compile=true and bf16-mixed
    python scripts/benchmark.py --speedups      # plus genlab with each of its speed-ups switched off
    python scripts/benchmark.py --device cuda   # the same on a GPU (data held on the GPU)

Workload: experiment=seed_vae_mnist (MLP VAE 784-256-2, batch 128, Adam 1e-3,
the 55,000 training images genlab keeps after its validation split).

  genlab      ``genlab-train experiment=seed_vae_mnist`` as a user runs it (Hydra,
              Lightning Trainer, TensorBoard logging, checkpoints, progress bar,
              image logging), with validation off as in the plain loops; per-epoch
              times come from a small callback (scripts/epoch_clock.py).
  plain       a hand-written loop: the training set as one tensor, batches by index
              (torch's default Adam, and again with the fused Adam genlab uses).
  lightning   the fused plain loop's model and batches in a bare Lightning Trainer:
              what Lightning's training loop costs before any of genlab's features.
  dataloader  the usual torchvision loop: MNIST Dataset + ToTensor + DataLoader.

Each variant runs in a fresh process: start-up is process start to the first
training step (the report also gives what imports alone cost); peak memory is
the process's maximum resident set. Epoch times are medians over --epochs
epochs after one warm-up epoch. The "genlab end to
end" row is (t(5) - t(1)) / 4 of whole ``genlab-train`` runs of 5 and 1 epochs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent
TRAIN_SIZE = 55_000  # genlab's training split: 60,000 minus data.val_size=5000
GENLAB_FLAGS = ["++trainer.limit_val_batches=0", "++trainer.limit_test_batches=1"]
# The genlab-train installed beside this Python, else the one on PATH.
_BESIDE = Path(sys.executable).parent / "genlab-train"
GENLAB_TRAIN = str(_BESIDE) if _BESIDE.exists() else "genlab-train"


# -- the plain loops, run in their own process (``benchmark.py --worker ...``) -----------------


def _seed_vae(width: int, fused: bool = False):
    import torch
    from torch import nn

    encoder = nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, 4))
    decoder = nn.Sequential(nn.Linear(2, width), nn.ReLU(), nn.Linear(width, 784))
    params = [*encoder.parameters(), *decoder.parameters()]
    # fused=None is torch's default: the per-tensor loop on a CPU.
    return encoder, decoder, torch.optim.Adam(params, 1e-3, fused=fused or None)


def _vae_loss(encoder, decoder, x):
    import torch
    import torch.nn.functional as F

    x = x.flatten(1)
    mu, logvar = encoder(x).chunk(2, dim=1)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    recon = F.binary_cross_entropy_with_logits(decoder(z), x, reduction="sum")
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum()
    return (recon + kl) / x.size(0)


def _vae_step(encoder, decoder, optimizer, x) -> None:
    loss = _vae_loss(encoder, decoder, x)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _timed_epochs(args: argparse.Namespace, fused: bool, epoch_batches) -> dict:
    """Train the seed VAE on ``epoch_batches()`` (one iterable per epoch) for a
    warm-up epoch and ``args.epochs`` more, recording when each epoch starts."""
    import torch

    device = torch.device(args.device)
    encoder, decoder, optimizer = _seed_vae(args.width, fused)
    encoder.to(device), decoder.to(device)
    starts = []
    for _ in range(args.epochs + 1):
        for i, x in enumerate(epoch_batches()):
            if i == 0:
                _sync(device)
                starts.append(time.time())
            _vae_step(encoder, decoder, optimizer, x.to(device))
    _sync(device)
    return {"epoch_starts": starts, "end": time.time()}


def _training_images(args: argparse.Namespace):
    """genlab's 55,000 training images as one float tensor on ``args.device``."""
    import torch
    from torchvision.datasets import MNIST

    images = MNIST(args.data_dir, train=True).data[:TRAIN_SIZE]
    return (images.float() / 255).unsqueeze(1).to(torch.device(args.device))


def _plain_worker(args: argparse.Namespace) -> dict:
    import torch

    device = torch.device(args.device)
    torch.manual_seed(0)
    data = _training_images(args)

    def batches():
        order = torch.randperm(TRAIN_SIZE, device=device)
        return (data[order[i : i + args.batch_size]] for i in range(0, TRAIN_SIZE, args.batch_size))

    return _timed_epochs(args, args.worker == "plain_fused", batches)


def _lightning_worker(args: argparse.Namespace) -> dict:
    """The plain loop's model, fused Adam and batches inside a bare Lightning Trainer
    (no logger, checkpoints, progress bar, summary or pictures): Lightning's own cost."""
    import pytorch_lightning as pl
    import torch
    from epoch_clock import EpochClock

    torch.manual_seed(0)
    data = _training_images(args)
    encoder, decoder, optimizer = _seed_vae(args.width, fused=True)

    class Batches:
        def __len__(self) -> int:
            return math.ceil(TRAIN_SIZE / args.batch_size)

        def __iter__(self):
            order = torch.randperm(TRAIN_SIZE, device=data.device)
            for i in range(0, TRAIN_SIZE, args.batch_size):
                yield data.index_select(0, order[i : i + args.batch_size])

    class SeedVAE(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.encoder, self.decoder = encoder, decoder

        def training_step(self, x, batch_idx):
            return _vae_loss(self.encoder, self.decoder, x)

        def configure_optimizers(self):
            return optimizer

    clock = EpochClock(args.worker_out)
    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        max_epochs=args.epochs + 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    trainer.fit(SeedVAE(), train_dataloaders=Batches())
    return json.loads(Path(args.worker_out).read_text())


def _dataloader_worker(args: argparse.Namespace) -> dict:
    import torch
    from torch.utils.data import DataLoader, Subset
    from torchvision.datasets import MNIST
    from torchvision.transforms import ToTensor

    torch.manual_seed(0)
    dataset = Subset(MNIST(args.data_dir, train=True, transform=ToTensor()), range(TRAIN_SIZE))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True)
    return _timed_epochs(args, False, lambda: (x for x, _ in loader))


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


# -- the driver -----------------------------------------------------------------------------


def _run(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float, float]:
    """Run ``command``; returns (start time, wall seconds, peak resident MiB)."""
    start = time.time()
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark: {' '.join(command)} failed:\n{stderr[-3000:]}")
    return start, wall, usage.ru_maxrss / 1024


def _epochs(record: dict, launched: float) -> dict:
    starts, end = record["epoch_starts"], record["end"]
    durations = [b - a for a, b in zip(starts[1:], [*starts[2:], end])]  # epoch 0 warms up
    return {
        "epoch_s": statistics.median(durations),
        "epoch_all": durations,
        "startup_s": starts[0] - launched,
    }


# genlab's speed options, benchmarked with --options (one run each).
OPTIONS = {"compile": ["model.compile=true"], "bf16": ["trainer.precision=bf16-mixed"]}


def _genlab_command(args, run_dir: Path, epochs: int, *overrides: str) -> list[str]:
    return [
        GENLAB_TRAIN,
        "experiment=seed_vae_mnist",
        f"trainer.max_epochs={epochs}",
        f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
        f"data.data_dir={args.data_dir}",
        f"hydra.run.dir={run_dir}",
        *GENLAB_FLAGS,
        *args.genlab_overrides,
        *overrides,
    ]


def _scripts_env() -> dict[str, str]:
    """The environment with scripts/ on PYTHONPATH, for callbacks genlab-train loads from there."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")]),
    }


def _genlab(
    args, workdir: Path, batch_size: int, width: int, tag: str, extra: tuple[str, ...] = ()
) -> dict:
    clock = workdir / f"{tag}.json"
    command = _genlab_command(
        args,
        workdir / tag,
        args.epochs + 1,
        f"data.batch_size={batch_size}",
        f"model.net.hidden_dims=[{width}]",
        "+callbacks.clock._target_=epoch_clock.EpochClock",
        f"+callbacks.clock.path={clock}",
        *extra,
    )
    launched, _, rss = _run(command, _scripts_env())
    return {**_epochs(json.loads(clock.read_text()), launched), "rss_mib": rss}


def _worker(args, kind: str, workdir: Path, batch_size: int, width: int, tag: str) -> dict:
    out = workdir / f"{tag}.json"
    command = [
        sys.executable, __file__, "--worker", kind, "--worker-out", str(out),
        "--epochs", str(args.epochs), "--batch-size", str(batch_size), "--width", str(width),
        "--device", args.device, "--data-dir", args.data_dir,
    ]  # fmt: skip
    launched, _, rss = _run(command)
    return {**_epochs(json.loads(out.read_text()), launched), "rss_mib": rss}


def _end_to_end(args, workdir: Path) -> float:
    """(t(5) - t(1)) / 4 for whole genlab-train runs."""
    walls = {
        epochs: _run(_genlab_command(args, workdir / f"end_to_end_{epochs}", epochs))[1]
        for epochs in (1, 5)
    }
    return (walls[5] - walls[1]) / 4


def _import_seconds(statement: str) -> float:
    """Wall time of a fresh ``python -c <statement>``: the start-up that imports alone cost."""
    return _run([sys.executable, "-c", statement])[1]


# What each kind of run imports before its first step.
IMPORTS = {"genlab": "import genlab.train", "plain": "import torch, torchvision"}


def cpu_name() -> str:
    """The processor's model name (Linux), else what ``platform`` knows of it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def _versions() -> str:
    from importlib.metadata import version

    names = ["torch", "torchvision", "pytorch-lightning", "hydra-core", "genlab"]
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        check=False,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return ", ".join(f"{n} {version(n)}" for n in names) + f" (commit {commit or 'unknown'})"


def _merge(runs: list[dict]) -> dict:
    """One variant's runs over all rounds: medians of every measured epoch and of start-ups."""
    epochs = [d for r in runs for d in r["epoch_all"]]
    return {
        "epoch_s": statistics.median(epochs),
        "epoch_all": epochs,
        "startup_s": statistics.median(r["startup_s"] for r in runs),
        "rss_mib": max(r["rss_mib"] for r in runs),
    }


def _row(name: str, r: dict, plain: float) -> str:
    spread = f"{min(r['epoch_all']):.2f}-{max(r['epoch_all']):.2f}"
    return (
        f"| {name} | {r['epoch_s']:.2f} | {spread} | {r['epoch_s'] / plain:.2f} "
        f"| {r['startup_s']:.1f} | {r['rss_mib']:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--epochs", type=int, default=4, help="measured epochs per run, after 1 warm-up (>= 3)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="runs of each variant, interleaved (the machine's speed drifts)",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--data-dir", default=os.environ.get("GENLAB_DATA_DIR", "./data"))
    parser.add_argument(
        "--scaling", action="store_true", help="also epoch time against batch size and width"
    )
    parser.add_argument(
        "--options", action="store_true", help="also genlab with model.compile=true and bf16-mixed"
    )
    parser.add_argument(
        "--speedups", action="store_true", help="also genlab with each speed-up switched off"
    )
    parser.add_argument("--out", default=str(REPO / "BENCHMARKS.md"), help="report to write")
    parser.add_argument("--batch-size", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument(
        "--worker",
        choices=["plain", "plain_fused", "lightning", "dataloader"],
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument(
        "genlab_overrides",
        nargs="*",
        help="extra genlab-train overrides, e.g. trainer.precision=bf16-mixed",
    )
    args = parser.parse_args()  # fmt: skip

    if args.worker:
        workers = {"dataloader": _dataloader_worker, "lightning": _lightning_worker}
        record = workers.get(args.worker, _plain_worker)(args)
        Path(args.worker_out).write_text(json.dumps(record))
        return
    if args.epochs < 3:
        parser.error("--epochs must be at least 3 (the medians need them)")

    runs: dict[str, list[dict]] = {
        "genlab": [],
        "plain": [],
        "plain_fused": [],
        "lightning": [],
        "dataloader": [],
    }
    end_to_end: list[float] = []
    imports: dict[str, list[float]] = {name: [] for name in IMPORTS}
    scaling = []
    with tempfile.TemporaryDirectory(prefix="genlab-benchmark-") as tmp:
        workdir = Path(tmp)
        print(f"Running on {_machine()} ...", flush=True)
        for i in range(args.rounds):
            runs["genlab"].append(_genlab(args, workdir, 128, 256, f"genlab{i}"))
            runs["plain"].append(_worker(args, "plain", workdir, 128, 256, f"plain{i}"))
            runs["plain_fused"].append(_worker(args, "plain_fused", workdir, 128, 256, f"fused{i}"))
            runs["lightning"].append(_worker(args, "lightning", workdir, 128, 256, f"lightning{i}"))
            if i == 0:  # many times slower: one run measures it well enough
                runs["dataloader"].append(
                    _worker(args, "dataloader", workdir, 128, 256, "dataloader")
                )
            if args.device == "cpu":
                end_to_end.append(_end_to_end(args, workdir / f"round{i}"))
            for name, statement in IMPORTS.items():
                imports[name].append(_import_seconds(statement))
            print(
                f"  round {i + 1}/{args.rounds}: genlab {runs['genlab'][-1]['epoch_s']:.2f} s, "
                f"plain {runs['plain'][-1]['epoch_s']:.2f} s, "
                f"plain with fused Adam {runs['plain_fused'][-1]['epoch_s']:.2f} s, "
                f"bare Lightning {runs['lightning'][-1]['epoch_s']:.2f} s per epoch",
                flush=True,
            )
        if args.options:
            for name, overrides in OPTIONS.items():
                runs[name] = [_genlab(args, workdir, 128, 256, name, tuple(overrides))]
                print(f"  genlab {' '.join(overrides)}: {runs[name][0]['epoch_s']:.2f} s per epoch")
        speedups: dict[str, list[float]] = {}
        if args.speedups:
            speedups = _speedups(args, workdir)
        if args.scaling:
            for width in (256, 512, 1024):
                for batch_size in (64, 128, 256, 512, 1024):
                    tag = f"b{batch_size}_w{width}"
                    g = _genlab(args, workdir, batch_size, width, "genlab_" + tag)
                    p = _worker(args, "plain", workdir, batch_size, width, "plain_" + tag)
                    scaling.append((batch_size, width, g["epoch_s"], p["epoch_s"]))
                    print(
                        f"  batch {batch_size}, width {width}: genlab {g['epoch_s']:.2f} s, plain {p['epoch_s']:.2f} s",
                        flush=True,
                    )

    results = {name: _merge(r) for name, r in runs.items()}
    end_to_end_s = statistics.median(end_to_end) if end_to_end else None
    import_s = {name: statistics.median(times) for name, times in imports.items()}
    report = _report(args, results, end_to_end_s, scaling, import_s, speedups)
    print(report)
    Path(args.out).write_text(report)
    print(f"Written to {args.out}")


# Pairs of timed epochs (with and without) per speed-up in each --speedups run.
SPEEDUP_PAIRS = 4


def _speedups(args, workdir: Path) -> dict[str, list[float]]:
    """For each speed-up, (epoch without it - epoch with it) / epoch without it, for every
    pair of neighbouring epochs of --rounds genlab-train runs (scripts/speedups.py)."""
    from speedups import SPEEDUPS, epochs, worth

    shares: dict[str, list[float]] = {name: [] for name in SPEEDUPS}
    for i in range(args.rounds):
        record = workdir / f"speedups{i}.json"
        command = _genlab_command(
            args,
            workdir / f"speedups{i}",
            epochs(SPEEDUP_PAIRS),
            "+callbacks.speedups._target_=speedups.Toggle",
            f"+callbacks.speedups.path={record}",
            f"+callbacks.speedups.pairs={SPEEDUP_PAIRS}",
        )
        _run(command, _scripts_env())
        for name, values in worth(json.loads(record.read_text())).items():
            shares[name] += values
        print(
            f"  speed-ups, run {i + 1}/{args.rounds}: "
            + ", ".join(f"{n} {100 * statistics.median(v):+.1f}%" for n, v in shares.items()),
            flush=True,
        )
    return shares


def _speedup_lines(args, speedups: dict[str, list[float]]) -> list[str]:
    from speedups import SPEEDUPS

    lines = [
        "",
        "## What each speed-up is worth",
        "",
        (
            f"`--speedups`: {args.rounds} runs of the workload above, each switching one speed-up "
            f"off at a time (`scripts/speedups.py`): {SPEEDUP_PAIRS} pairs of nearby epochs, "
            "with and without, per speed-up and run, in alternating order. "
            "Worth: (epoch without it - epoch with it) / epoch without it; the median over all "
            "pairs, and the middle half of them. docs/PERFORMANCE.md says why each exists."
        ),
        "",
        "| speed-up | worth (% of an epoch) | middle half of the pairs (%) |",
        "|---|---|---|",
    ]
    for name, shares in speedups.items():
        low, _, high = statistics.quantiles(shares, n=4)
        lines.append(
            f"| {SPEEDUPS[name][0]} | {100 * statistics.median(shares):+.1f} | "
            f"{100 * low:+.1f} to {100 * high:+.1f} |"
        )
    return lines


def _report(
    args,
    results: dict,
    end_to_end: float | None,
    scaling: list,
    imports: dict[str, float],
    speedups: dict[str, list[float]],
) -> str:
    plain = results["plain"]["epoch_s"]
    genlab = results["genlab"]["epoch_s"]
    fused, floor = results["plain_fused"]["epoch_s"], results["lightning"]["epoch_s"]
    command = " ".join(["python scripts/benchmark.py", *sys.argv[1:]])
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{command}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
        f"- Machine: {_machine()}; device `{args.device}`.",
        f"- Versions: Python {platform.python_version()}, {_versions()}.",
        f"- Workload: `experiment=seed_vae_mnist` (MLP VAE 784-256-2, batch 128, Adam), {TRAIN_SIZE:,} training images,",
        "  validation off.",
        f"- Epoch times: median (and range) of every measured epoch: {args.rounds} interleaved runs of",
        f"  each variant, {args.epochs} epochs each after one warm-up epoch (the dataloader loop: one run).",
        "",
        "| variant | epoch (s) | range (s) | / plain | start-up (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|",
        _row("genlab (`genlab-train`, its defaults)", results["genlab"], plain),
        _row(
            "plain loop (one tensor, batches by index; torch's default Adam)",
            results["plain"],
            plain,
        ),
        _row(
            "plain loop with fused Adam (genlab's default optimizer)", results["plain_fused"], plain
        ),
        _row(
            "the fused-Adam plain loop in a bare Lightning Trainer (no logger, checkpoints, "
            "progress bar or pictures)",
            results["lightning"],
            plain,
        ),
        _row("torchvision Dataset + ToTensor + DataLoader", results["dataloader"], plain),
        *(
            _row(f"genlab, `{' '.join(OPTIONS[name])}` (one run)", results[name], plain)
            for name in OPTIONS
            if name in results
        ),
    ]
    if end_to_end is not None:
        lines.append(
            f"| genlab end to end, (t(5) - t(1)) / 4 | {end_to_end:.2f} | | {end_to_end / plain:.2f} | | |"
        )
    lines += [
        "",
        f"Goals: genlab / plain <= 1.10 (measured {genlab / plain:.2f}; end to end "
        + (f"{end_to_end / plain:.2f}" if end_to_end is not None else "not measured")
        + f"); dataloader / genlab >= 2.5 (measured {results['dataloader']['epoch_s'] / genlab:.2f}); "
        f"start-up <= 5 s (measured {results['genlab']['startup_s']:.1f} s).",
        "",
        (
            f"Against the plain loop with genlab's fused Adam ({fused:.2f} s), genlab takes "
            f"{genlab / fused:.2f}x and the bare Lightning Trainer {floor / fused:.2f}x: of genlab's "
            f"{genlab - fused:.2f} s per epoch above that loop, {floor - fused:.2f} s is Lightning's "
            "training loop itself."
        ),
        "",
        (
            f"Start-up is mostly imports: `{IMPORTS['genlab']}` (Lightning, which imports "
            f"torchmetrics, torchvision and torch) takes {imports['genlab']:.1f} s in a fresh "
            f"process, `{IMPORTS['plain']}` {imports['plain']:.1f} s (medians over the rounds)."
        ),
        "",
        "`t(n)`: the wall time of `genlab-train experiment=seed_vae_mnist trainer.max_epochs=n "
        + " ".join(GENLAB_FLAGS)
        + "`, median over the rounds.",
    ]
    if speedups:
        lines += _speedup_lines(args, speedups)
    if scaling:
        lines += [
            "",
            "## Epoch time against batch size and hidden width",
            "",
            "One run each (1 warm-up epoch, then the median of the measured ones).",
            "",
            "| batch | width | genlab (s) | plain (s) | genlab / plain |",
            "|---|---|---|---|---|",
            *(f"| {b} | {w} | {g:.2f} | {p:.2f} | {g / p:.2f} |" for b, w, g, p in scaling),
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
