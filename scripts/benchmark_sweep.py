"""What a sweep costs around its epochs: wall time of whole `genlab-train -m` commands.

    python scripts/benchmark_sweep.py                      # this checkout
    python scripts/benchmark_sweep.py --compare OTHER_SRC  # and another genlab's src/, interleaved

Measures, for each genlab (runs interleaved, medians over --repeats):
  one_job_s       a 1-job sweep of 5 training batches: the command's fixed cost plus one job
  sixteen_jobs_s  a 16-job latent_dim x beta sweep of 5-batch jobs
  per_later_job_s (sixteen_jobs_s - one_job_s) / 15: what each further short job adds
and once each, a 16-job latent_dim x beta sweep of 3 full epochs with the basic and the
joblib launcher. Seed VAE size, pictures on (the defaults). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRID = ["model.latent_dim=2,4,8,16", "model.beta=0.5,1,2,4"]
SHORT = [
    "trainer.max_epochs=1",
    "++trainer.limit_train_batches=5",
    "++trainer.limit_val_batches=1",
    "++trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
]
THREE_EPOCHS = ["trainer.max_epochs=3", "trainer.enable_progress_bar=false"]


def sweep_seconds(src: str | None, args: list[str], folder: Path) -> float:
    """Wall time of one ``genlab-train -m`` command, with ``src`` first on the import path."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    command = [sys.executable, "-c", "from genlab.cli import train_command; train_command()"]
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run(
        [*command, "-m", *args, f"hydra.sweep.dir={folder}"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"the sweep failed:\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", help="another genlab's src/ folder, measured alongside")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-epochs", action="store_true", help="skip the 3-epoch sweeps")
    args = parser.parse_args()
    versions = {"this checkout": None, **({"compared": args.compare} if args.compare else {})}
    folder = Path(tempfile.mkdtemp(prefix="genlab-sweep-bench-"))
    short: dict[str, dict[str, list[float]]] = {v: {"one": [], "sixteen": []} for v in versions}
    for _ in range(args.repeats):  # interleaved, so that drift of the machine hits both alike
        for name, src in versions.items():
            short[name]["one"].append(sweep_seconds(src, SHORT, folder / "one"))
            short[name]["sixteen"].append(sweep_seconds(src, [*GRID, *SHORT], folder / "sixteen"))
    print(
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"medians of {args.repeats} runs, interleaved.\n"
    )
    print("| genlab | 1-job sweep (s) | 16-job sweep (s) | per later job (s) |")
    print("|---|---|---|---|")
    for name in versions:
        one = statistics.median(short[name]["one"])
        sixteen = statistics.median(short[name]["sixteen"])
        print(f"| {name} | {one:.1f} | {sixteen:.1f} | {(sixteen - one) / 15:.2f} |")
    if not args.no_epochs:
        print("\n| genlab | launcher | 16 jobs x 3 epochs (s) |")
        print("|---|---|---|")
        for name, src in versions.items():
            for launcher in ("basic", "joblib"):
                seconds = sweep_seconds(
                    src, [*GRID, *THREE_EPOCHS, f"hydra/launcher={launcher}"], folder / "epochs"
                )
                print(f"| {name} | {launcher} | {seconds:.0f} |")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
