"""The figures and tables of docs/RESULTS.md, from the runs of scripts/reproduce_results.sh.

    python scripts/results.py [RESULTS_DIR]     (default: outputs/results)

Writes docs/figures/{seed_vs_no_kl,samples,dcgan_samples,rate_distortion}.png and
prints the tables in Markdown. A stage that has not been run is named and left out,
with the figures that need it (their files stay as they are).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import torch
from benchmark import cpu_name  # scripts/benchmark.py, beside this file

from genlab.checkpoints import load_model
from genlab.data import ImageDataModule

FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures"
# Burda et al. 2015, Table 1: VAE, one stochastic layer (50 units), k = 1, test NLL in nats.
BURDA_VAE_NLL = 86.76


def _read(path: Path) -> dict:
    if not path.is_file():
        sys.exit(f"{path} is missing: run scripts/reproduce_results.sh for that stage first.")
    return json.loads(path.read_text())


def _wall(folder: Path) -> int | None:
    wall = folder / "wall_time_s"
    return int(wall.read_text()) if wall.is_file() else None


def _stage(results: Path, name: str) -> dict | None:
    """A stage's training metrics, evaluation metrics (if evaluated), wall time and commit;
    None for a stage not run."""
    folder = results / name
    if not (folder / "run" / "metrics.json").is_file():
        print(f"({name}: not run, left out)", file=sys.stderr)
        return None
    commit = folder / "commit"
    evaluation_file = folder / "eval" / "metrics.json"
    train = _read(folder / "run" / "metrics.json")
    evaluation = _read(evaluation_file) if evaluation_file.is_file() else {}
    return {
        "train": train,
        "eval": evaluation,
        # As each command measured itself.
        "train_s": train.get("wall_time_s"),
        "eval_s": evaluation.get("eval_wall_time_s"),
        "commit": commit.read_text().strip() if commit.is_file() else "?",
        "images": folder / "run" / "images",
    }


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _sweep_cell(key: str, value: str) -> str:
    number = float(value)
    if key == "test/knn_acc":
        return f"{number:.3f}"
    return f"{number:g}" if number.is_integer() or key.startswith("model.") else f"{number:.1f}"


def _minutes(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds / 60:.1f} min"


def _show(ax, path: Path, title: str) -> None:
    ax.imshow(mpimg.imread(path), cmap="gray")
    ax.set_title(title, fontsize=10)
    ax.axis("off")


def mnist_test_images(data_dir: str) -> torch.Tensor:
    data = ImageDataModule("mnist", data_dir, eval_batch_size=10_000, download=False)
    data.setup("test")
    (images, _), *_ = data.test_dataloader()
    return images


def code_spread(ckpt: Path, images: torch.Tensor) -> dict[str, float]:
    """How far a VAE's posterior means of the test images lie from the prior's range."""
    model = load_model(ckpt).eval()
    with torch.no_grad():
        mu = model.encode(images)[0]
    return {
        "std": float(mu.std(0).mean()),
        "max_abs": float(mu.abs().max()),
        "outside_3": float((mu.abs() > 3).any(1).float().mean()),
    }


def _samples_figure(stages: dict, names: list[str], path: Path) -> None:
    """The final samples of each named stage side by side, titled with its FID."""
    if any(stages.get(name) is None for name in names):
        return
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4.4))
    for ax, name in zip(axes, names):
        fid = stages[name]["eval"].get("test/fid")
        # The AE's samples decode a Gaussian fitted to its codes: samples_fitted_gaussian_final.png.
        (samples,) = stages[name]["images"].glob("samples*_final.png")
        _show(ax, samples, f"{name}: FID {_fmt(fid, 1)}")
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")


def main(results: Path) -> None:
    names = ["seed_vae_mnist", "seed_vae_mnist_no_kl", "vae_mnist_nll"]
    names += ["vae_mnist_nll_30", "iwae_mnist_nll_30", "cbernoulli_vae_mnist"]
    names += ["ae_fashion", "gan_mnist", "gan_fashion", "dcgan_mnist", "dcgan_fashion"]
    stages = {name: _stage(results, name) for name in names}
    sweep = results / "latent_beta_sweep"
    FIGURES.mkdir(parents=True, exist_ok=True)
    plt.switch_backend("Agg")

    # The seed VAE beside the same model without its KL term.
    if stages["seed_vae_mnist"] and stages["seed_vae_mnist_no_kl"]:
        fig, axes = plt.subplots(2, 3, figsize=(12, 8.4))
        for row, name in zip(axes, ["seed_vae_mnist", "seed_vae_mnist_no_kl"]):
            images = stages[name]["images"]
            label = "with KL (beta = 1)" if name == "seed_vae_mnist" else "KL missing (beta = 0)"
            _show(row[0], images / "manifold_final.png", f"{label}: manifold, [-3, 3]²")
            _show(row[1], images / "samples_final.png", f"{label}: prior samples")
            _show(row[2], images / "latent_final.png", f"{label}: test codes")
        fig.tight_layout()
        fig.savefig(FIGURES / "seed_vs_no_kl.png", dpi=90)

    _samples_figure(stages, ["gan_mnist", "gan_fashion", "ae_fashion"], FIGURES / "samples.png")
    _samples_figure(stages, ["dcgan_mnist", "dcgan_fashion"], FIGURES / "dcgan_samples.png")
    plt.close("all")
    if (sweep / "rate_distortion.png").is_file():
        shutil.copyfile(sweep / "rate_distortion.png", FIGURES / "rate_distortion.png")

    print(f"Machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}\n")
    header = "| experiment | commit | test −ELBO | test NLL (K=5000) | FID | IS | training | evaluation |"
    print(header)
    print("|---|---|---|---|---|---|---|---|")
    for name, stage in stages.items():
        if stage is None:
            continue
        ev = stage["eval"]
        row = [
            f"`{name}`",
            stage["commit"],
            _fmt(ev.get("test/neg_elbo")),
            _fmt(ev.get("test/nll")),
            _fmt(ev.get("test/fid"), 1),
            _fmt(ev.get("test/is")),
            _minutes(stage["train_s"]),
            _minutes(stage["eval_s"]),
        ]
        print("| " + " | ".join(row) + " |")

    _code_spread_table(results, stages)
    _nll_lines(stages)
    _sweep_table(sweep)


def _code_spread_table(results: Path, stages: dict) -> None:
    if not (stages["seed_vae_mnist"] and stages["seed_vae_mnist_no_kl"]):
        return
    print("\n| | test KL | std of the codes | largest \\|code\\| | codes outside [-3, 3] |")
    print("|---|---|---|---|---|")
    test_images = mnist_test_images(os.environ.get("GENLAB_DATA_DIR", "./data"))
    for name in ["seed_vae_mnist", "seed_vae_mnist_no_kl"]:
        ckpt = results / name / "run" / "checkpoints" / "last.ckpt"
        spread = code_spread(ckpt, test_images)
        kl = stages[name]["eval"].get("test/kl")
        print(
            f"| `{name}` | {_fmt(kl)} | {spread['std']:.2f} | {spread['max_abs']:.1f} "
            f"| {100 * spread['outside_3']:.1f}% |"
        )


def _nll_lines(stages: dict) -> None:
    if stages["vae_mnist_nll"] is None:
        return
    nll = stages["vae_mnist_nll"]["eval"].get("test/nll")
    print(f"\nvae_mnist_nll: test NLL {_fmt(nll)} nats; Burda et al. {BURDA_VAE_NLL}; ", end="")
    print(f"gap {_fmt(None if nll is None else nll - BURDA_VAE_NLL)} nats")


def _sweep_table(sweep: Path) -> None:
    if not (sweep / "summary.csv").is_file():
        print("(latent_beta_sweep: not run, left out)", file=sys.stderr)
        return
    print(f"\nSweep ({_minutes(_wall(sweep))}), from {sweep / 'summary.csv'}:\n")
    columns = {
        "model.latent_dim": "latent_dim",
        "model.beta": "beta",
        "test/neg_elbo": "test −ELBO",
        "test/nll": "test NLL (K=100)",
        "test/recon": "distortion (recon)",
        "test/kl": "rate (KL)",
        "test/active_units": "active units",
        "test/knn_acc": "k-NN accuracy",
    }
    print("| " + " | ".join(columns.values()) + " |")
    print("|" + "---|" * len(columns))
    with (sweep / "summary.csv").open() as f:
        for row in csv.DictReader(f):
            print("| " + " | ".join(_sweep_cell(key, row[key]) for key in columns) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/results"))
