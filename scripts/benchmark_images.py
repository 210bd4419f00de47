"""What the pictures cost: a training run with the image callback against the same run without it.

    python scripts/benchmark_images.py [--repeats 3] [--epochs 5] [extra overrides ...]

Runs ``genlab-train experiment=seed_vae_mnist trainer.max_epochs=<epochs>`` with
the default pictures and with ``callbacks.images=null``, alternating the two so
that a slower moment of the machine hits both, and prints the median wall time
of each (the whole process, start-up included) and their ratio. Needs the data
sets (``GENLAB_DATA_DIR``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed_run(overrides: list[str], run_dir: Path) -> tuple[float, float]:
    """Wall time of one genlab-train process, and the train() time it records in metrics.json."""
    exe = shutil.which("genlab-train", path=str(Path(sys.executable).parent)) or "genlab-train"
    start = time.perf_counter()
    subprocess.run(
        [exe, *overrides, f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false"],
        check=True,
        capture_output=True,
    )
    wall = time.perf_counter() - start
    return wall, json.loads((run_dir / "metrics.json").read_text())["wall_time_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="extra genlab-train overrides")
    args = parser.parse_args()

    base = ["experiment=seed_vae_mnist", f"trainer.max_epochs={args.epochs}", *args.overrides]
    variants = {"with pictures": base, "without pictures": [*base, "callbacks.images=null"]}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for index, (name, overrides) in enumerate(variants.items()):
                run_dir = Path(tmp) / f"{repeat}-{index}"
                times[name].append(timed_run(overrides, run_dir))
                print(
                    f"run {repeat + 1}/{args.repeats} {name}: {times[name][-1][0]:.1f} s",
                    flush=True,
                )

    medians = {
        name: (statistics.median(w for w, _ in runs), statistics.median(t for _, t in runs))
        for name, runs in times.items()
    }
    print(f"\n{'':18}{'process (s)':>12}{'train() (s)':>13}")
    for name, (wall, inner) in medians.items():
        print(f"{name:18}{wall:12.1f}{inner:13.1f}")
    (with_wall, with_inner), (without_wall, without_inner) = medians.values()
    print(
        f"{'ratio':18}{with_wall / without_wall:12.3f}{with_inner / without_inner:13.3f}"
        f"   (medians of {args.repeats}; command: genlab-train {' '.join(base)})"
    )


if __name__ == "__main__":
    main()
