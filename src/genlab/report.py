"""genlab-report: one table and a few figures for a whole sweep.

    genlab-report SWEEP_DIR

Reads every job under SWEEP_DIR (each folder holding ``.hydra/overrides.yaml``),
with its ``metrics.json`` when the job has finished, and writes into SWEEP_DIR:

    summary.csv             one row per job: swept values, status, epochs, wall time, metrics
    summary.md              the same table, the best finished job marked
    rate_distortion.png     test KL against test reconstruction, one line per latent_dim (VAE)
    metric_vs_latent_dim.png  test -ELBO (and NLL when evaluated) against latent_dim, one line per beta
    latents_grid.png        every job's final latent scatter on one scale (or its manifold), labelled

Jobs without a metrics.json (still running, or killed) are listed as ``unfinished``. A
multirun writes its report by itself when its last job ends (`SweepReport`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from genlab.continuation import last_attempts
from genlab.errors import GenlabError
from genlab.rundir import LATENT_POINTS_FILE, METRICS_FILE

log = logging.getLogger(__name__)

SUMMARY_CSV, SUMMARY_MD = "summary.csv", "summary.md"
RATE_DISTORTION = "rate_distortion.png"
METRIC_VS_LATENT_DIM = "metric_vs_latent_dim.png"
LATENTS_GRID = "latents_grid.png"
# The metric that ranks jobs: the first of these that finished jobs report (lower is better).
RANKING_METRICS = ("test/nll", "test/neg_elbo", "test/loss", "test/fid")
# The latents grid shows at most this many jobs (evenly spaced over a larger sweep), and a
# rate-distortion line with more points than _LABELLED_POINTS labels only its ends.
_MAX_PANELS = 25
_LABELLED_POINTS = 6
# Pictures that show a job's latent space, in order of preference (see genlab.callbacks).
_LATENT_PICTURES = ("latent_final.png", "manifold_final.png", "samples_final.png")


@dataclass
class Job:
    """One job of a sweep: where it ran, what it overrode, and what it reported."""

    folder: Path
    overrides: dict[str, str]
    config: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    unreadable: str | None = None  # why a file of the job could not be read
    attempt: str = ""  # what the latest command did with it: run, resume, reuse, refused

    @property
    def status(self) -> str:
        if self.unreadable:
            return "unreadable"
        return self.metrics.get("status", "unfinished")  # running, or killed before it could say

    @property
    def error(self) -> str:
        return self.unreadable or str(self.metrics.get("error", ""))

    def option(self, key: str) -> Any:
        """A config value by dotted key (``model.latent_dim``), or None."""
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node


def find_jobs(sweep_dir: Path) -> list[Job]:
    """Every job folder under ``sweep_dir``, in order of their job numbers (folder names)."""
    jobs = []
    attempts = last_attempts(sweep_dir)
    for overrides_file in sorted(sweep_dir.glob("**/.hydra/overrides.yaml"), key=_job_order):
        folder = overrides_file.parent.parent
        if "eval" in folder.relative_to(sweep_dir).parts[1:]:
            continue  # a genlab-eval run inside a job's folder, not a job
        problems: list[str] = []
        items = _read(folder, ".hydra/overrides.yaml", yaml.safe_load, list, problems)
        overrides = {}
        for item in items:
            key, _, value = str(item).partition("=")
            overrides[key.lstrip("+~")] = value
        config = _read(folder, ".hydra/config.yaml", yaml.safe_load, dict, problems)
        metrics = _read(folder, METRICS_FILE, json.loads, dict, problems)
        unreadable = "; ".join(problems) or None
        jobs.append(
            Job(folder, overrides, config, metrics, unreadable, attempts.get(folder.name, ""))
        )
    return jobs


def _read(folder: Path, name: str, parse: Any, kind: type, problems: list[str]) -> Any:
    """The job file ``folder/name`` parsed, or an empty ``kind`` when it is missing; when it
    cannot be read (damaged, or not what genlab writes), an empty ``kind`` and a line in
    ``problems``."""
    path = folder / name
    if not path.is_file():
        return kind()
    try:
        value = parse(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        problems.append(f"{name} cannot be read ({' '.join(str(err).split())[:120]})")
        return kind()
    if value is not None and not isinstance(value, kind):
        problems.append(f"{name} holds a {type(value).__name__}, not a {kind.__name__}")
        return kind()
    return value or kind()


def _job_order(overrides_file: Path) -> tuple[int, str]:
    name = overrides_file.parent.parent.name
    return (int(name), "") if name.isdigit() else (sys.maxsize, str(overrides_file))


def _override_values(jobs: list[Job]) -> dict[str, set[str | None]]:
    """Each override key of the sweep and the values the jobs gave it (None: not given)."""
    keys = sorted({key for job in jobs for key in job.overrides})
    return {key: {job.overrides.get(key) for job in jobs} for key in keys}


def swept_keys(jobs: list[Job]) -> list[str]:
    """The overrides whose values differ between jobs: what the sweep varied."""
    return [key for key, values in _override_values(jobs).items() if len(values) > 1]


def fixed_overrides(jobs: list[Job]) -> dict[str, str]:
    """The overrides every job was given with the same value: the sweep's fixed settings
    (``trainer.max_epochs=1`` says the numbers come from one epoch)."""
    return {
        key: next(iter(values))
        for key, values in _override_values(jobs).items()
        if len(values) == 1 and None not in values
    }


def ranking_metric(jobs: list[Job]) -> str | None:
    finished = [job for job in jobs if job.status == "completed"]
    for name in RANKING_METRICS:
        if any(_number(job.metrics.get(name)) is not None for job in finished):
            return name
    return None


def best_job(jobs: list[Job], metric: str | None) -> Job | None:
    scored = [
        (value, job)
        for job in jobs
        if job.status == "completed" and (value := _number(job.metrics.get(metric))) is not None
    ]
    return min(scored, key=lambda pair: pair[0])[1] if scored else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def summary_rows(jobs: list[Job], sweep_dir: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """The columns and rows of the summary table, one row per job."""
    keys = swept_keys(jobs)
    best = best_job(jobs, ranking_metric(jobs))
    metric_names = sorted(
        {name for job in jobs for name in job.metrics if name.startswith(("val/", "test/"))}
    )
    columns = ["job", *keys, "status", "attempt", "epochs", "wall_time_s", *metric_names]
    columns += ["best", "error"]
    rows = []
    for job in jobs:
        row: dict[str, Any] = {
            "job": str(job.folder.relative_to(sweep_dir)),
            **{key: job.overrides.get(key, "") for key in keys},
            "status": job.status,
            "attempt": job.attempt,
            "epochs": job.metrics.get("epochs", ""),
            "wall_time_s": job.metrics.get("wall_time_s", ""),
            **{name: job.metrics.get(name, "") for name in metric_names},
            "best": job is best,
            "error": job.error,
        }
        rows.append(row)
    return columns, rows


def write_tables(jobs: list[Job], sweep_dir: Path) -> None:
    columns, rows = summary_rows(jobs, sweep_dir)
    with (sweep_dir / SUMMARY_CSV).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    metric = ranking_metric(jobs)
    shown = [c for c in columns if c not in ("best", "error")]
    swept = swept_keys(jobs)
    fixed = fixed_overrides(jobs)
    lines = [
        f"# Sweep over {', '.join(swept) if swept else 'one setting'}",
        "",
        f"Folder: `{sweep_dir.resolve()}`.",
        "Every job ran with: "
        + (", ".join(f"`{key}={value}`" for key, value in fixed.items()) or "the defaults")
        + " (and what its row shows).",
        "",
        f"{len(jobs)} jobs: "
        + ", ".join(f"{sum(r['status'] == s for r in rows)} {s}" for s in _statuses(rows))
        + ".",
        _attempts_line(rows),
        f"Best (lowest {metric}, marked **best**) among finished jobs."
        if metric
        else "No finished job reports a test metric yet.",
        "",
        "| " + " | ".join(shown) + " |",
        "|" + "---|" * len(shown),
    ]
    for row in rows:
        cells = [_cell(row[c]) for c in shown]
        if row["best"]:
            cells[0] = f"**best** {cells[0]}"
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in rows if r["error"]]
    if failed:
        lines += ["", "Errors:", ""]
        lines += [f"- `{r['job']}`: {r['error']}" for r in failed]
    (sweep_dir / SUMMARY_MD).write_text("\n".join(lines) + "\n")


def _attempts_line(rows: list[dict[str, Any]]) -> str:
    """What the latest command did with the jobs (the ``attempt`` column)."""
    meaning = {"run": "run", "resume": "resumed", "reuse": "reused (finished before)"}
    counts = [
        f"{sum(r['attempt'] == a for r in rows)} {meaning.get(a, a)}"
        for a in ("run", "resume", "reuse", "refused")
        if any(r["attempt"] == a for r in rows)
    ]
    return f"Last command: {', '.join(counts)}." if counts else ""


def _statuses(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({row["status"] for row in rows})


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _figure(width: float, height: float) -> Any:
    # Imported here: the tables need no matplotlib, and it costs a second to import.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _finish(ax: Any, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    """Label a line plot, add its legend and grid, and save its figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.figure.savefig(path)


def _short(job: Job, keys: list[str]) -> str:
    """A job's swept values, short enough for a plot label: latent_dim=2 beta=0.5."""
    return " ".join(f"{key.rsplit('.', 1)[-1]}={job.overrides.get(key, '')}" for key in keys)


def plot_rate_distortion(jobs: list[Job], path: Path) -> bool:
    """KL (rate) against reconstruction (distortion), one line per latent_dim, points labelled by beta."""
    points = [
        (job.option("model.latent_dim"), job.option("model.beta"), kl, recon)
        for job in jobs
        if (kl := _number(job.metrics.get("test/kl"))) is not None
        and (recon := _number(job.metrics.get("test/recon"))) is not None
    ]
    if not points:
        return False
    figure = _figure(7, 5)
    ax = figure.add_subplot()
    for latent_dim in sorted({p[0] for p in points}, key=lambda d: (d is None, d)):
        line = sorted((p for p in points if p[0] == latent_dim), key=lambda p: p[1] or 0)
        ax.plot([p[2] for p in line], [p[3] for p in line], "o-", label=f"latent_dim={latent_dim}")
        # A long line (a large sweep) gets labels at its ends only, so that they stay legible.
        labelled = line if len(line) <= _LABELLED_POINTS else [line[0], line[-1]]
        for _, beta, kl, recon in labelled:
            ax.annotate(
                f"β={beta:g}" if beta is not None else "",
                (kl, recon),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    _finish(
        ax,
        path,
        "rate: test KL(q(z|x) || p(z)) (nats)",
        "distortion: test -log p(x|z) (nats)",
        "Rate against distortion on the test set (points labelled by beta)",
    )
    return True


def plot_metric_vs_latent_dim(jobs: list[Job], path: Path) -> bool:
    """Test -ELBO (solid) and NLL (dashed, when evaluated) against latent_dim, one line per beta."""
    rows = [
        (job.option("model.beta"), latent_dim, job.metrics)
        for job in jobs
        if isinstance(latent_dim := job.option("model.latent_dim"), int)
        and _number(job.metrics.get("test/neg_elbo")) is not None
    ]
    if not rows:
        return False
    figure = _figure(7, 5)
    ax = figure.add_subplot()
    for beta in sorted({r[0] for r in rows}, key=lambda b: (b is None, b)):
        line = sorted((r for r in rows if r[0] == beta), key=lambda r: r[1])
        dims = [r[1] for r in line]
        (drawn,) = ax.plot(
            dims, [r[2]["test/neg_elbo"] for r in line], "o-", label=f"β={beta} -ELBO"
        )
        nll = [_number(r[2].get("test/nll")) for r in line]
        if all(v is not None for v in nll):
            ax.plot(dims, nll, "s--", color=drawn.get_color(), label=f"β={beta} NLL")
    ax.set_xscale("log", base=2)
    ax.set_xticks(
        sorted({r[1] for r in rows}), labels=[str(d) for d in sorted({r[1] for r in rows})]
    )
    _finish(
        ax,
        path,
        "latent_dim",
        "test nats per image (lower is better)",
        "Test -ELBO against latent size",
    )
    return True


def plot_latents_grid(jobs: list[Job], path: Path) -> bool:
    """Every job's final latent scatter side by side, those with the same axes on one scale
    (so that the spread of the codes compares across jobs); a job without saved points
    shows its picture (scatter, manifold or samples) as it is."""
    keys = swept_keys(jobs)
    shown = jobs[:: math.ceil(len(jobs) / _MAX_PANELS)]  # a large sweep: evenly spaced jobs
    panels = []
    for job in shown:
        label = _short(job, keys) or job.folder.name
        points = _latent_points(job)
        picture = None if points else _latent_picture(job)
        if points or picture:
            panels.append((label, points, picture))
    if not panels:
        return False
    note = f" ({len(shown)} of {len(jobs)} jobs)" if len(shown) < len(jobs) else ""
    _plot_panels(panels, path, note)
    return True


def _latent_points(job: Job) -> dict[str, Any] | None:
    """The job's saved latent scatter points (plain arrays, no pickles), or None."""
    import zipfile

    import numpy as np

    try:
        with np.load(job.folder / "images" / LATENT_POINTS_FILE, allow_pickle=False) as data:
            points = {key: data[key] for key in ("points", "labels", "axes", "note", "class_names")}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    ok = points["points"].ndim == 2 and points["points"].shape[1] == 2
    return points if ok and len(points["labels"]) == len(points["points"]) else None


def _latent_picture(job: Job) -> Path | None:
    folder = job.folder / "images"
    return next((folder / n for n in _LATENT_PICTURES if (folder / n).is_file()), None)


def _plot_panels(panels: list[tuple[str, Any, Path | None]], path: Path, note: str) -> Any:
    """One panel per job: its scatter (the scatters with the same axes share one scale) or
    its picture."""
    from matplotlib import colormaps
    from matplotlib.lines import Line2D
    from PIL import Image

    cols = math.ceil(math.sqrt(len(panels)))
    rows = math.ceil(len(panels) / cols)
    figure = _figure(3.2 * cols, 3.0 * rows + 0.4)
    palette = colormaps["tab10"]
    first_of: dict[tuple[str, ...], Any] = {}  # the first scatter with each pair of axes
    scatter = None
    for index, (label, data, picture) in enumerate(panels):
        if data is None:
            ax = figure.add_subplot(rows, cols, index + 1)
            with Image.open(picture) as image:
                ax.imshow(image.convert("RGB"))
            ax.set_title(label, fontsize=8)
            ax.axis("off")
            continue
        axes_names = tuple(str(name) for name in data["axes"])
        shared = first_of.get(axes_names)
        ax = figure.add_subplot(rows, cols, index + 1, sharex=shared, sharey=shared)
        first_of.setdefault(axes_names, ax)
        xy, classes = data["points"], data["labels"]
        ax.scatter(xy[:, 0], xy[:, 1], c=palette(classes % 10), s=2, linewidths=0)
        panel_note = str(data["note"])
        ax.set_title(label + (f"\n{panel_note}" if panel_note else ""), fontsize=8)
        ax.set_xlabel(axes_names[0], fontsize=7)
        ax.set_ylabel(axes_names[1], fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        scatter = data
    title = "Codes of test images, coloured by class, on one scale" if scatter else "Latent spaces"
    figure.suptitle(title + note, fontsize=10)
    right = 1.0
    if scatter is not None:
        handles = [
            Line2D([], [], marker="o", linestyle="", color=palette(i % 10), label=str(name))
            for i, name in enumerate(scatter["class_names"])
        ]
        right = 0.88
        figure.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
    figure.tight_layout(rect=(0, 0, right, 1))
    figure.savefig(path)
    return figure


def write_report(sweep_dir: Path) -> list[Path]:
    """Write the tables and figures of the sweep in ``sweep_dir``; returns the files written."""
    if not sweep_dir.is_dir():
        raise GenlabError(
            f"{str(sweep_dir)!r} is not a folder; pass a sweep folder "
            "(outputs/multirun/<date>/<time>)."
        )
    jobs = find_jobs(sweep_dir)
    if not jobs:
        raise GenlabError(
            f"{str(sweep_dir)!r} holds no jobs (no <job>/.hydra/overrides.yaml below it); pass "
            "the folder a multirun wrote, e.g. outputs/multirun/<date>/<time>."
        )
    write_tables(jobs, sweep_dir)
    written = [sweep_dir / SUMMARY_CSV, sweep_dir / SUMMARY_MD]
    for plot, name in (
        (plot_rate_distortion, RATE_DISTORTION),
        (plot_metric_vs_latent_dim, METRIC_VS_LATENT_DIM),
        (plot_latents_grid, LATENTS_GRID),
    ):
        if plot(jobs, sweep_dir / name):
            written.append(sweep_dir / name)
    return written


# The jobs the latest multirun of this process refused (genlab-train then exits 1).
refused_jobs: list[str] = []


class SweepReport(Callback):
    """Hydra callback: says at the start how to continue the sweep after a stop; writes
    the report when the multirun ends and says where it is."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()
        sweep_dir = Path(config.hydra.sweep.dir)
        given = [a for a in sys.argv[1:] if not a.startswith("hydra.sweep.dir=")]
        again = " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *given])
        log.info(
            "Sweep folder: %s. If the sweep stops, this continues it (finished jobs are "
            "reused, stopped ones resumed): %s hydra.sweep.dir=%s",
            sweep_dir,
            again,
            shlex.quote(str(sweep_dir.resolve())),
        )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        # Read from the attempts file: the jobs of a parallel launcher ran in other processes.
        attempts = last_attempts(sweep_dir, since=getattr(self, "started", None))
        refused = [job for job, action in attempts.items() if action == "refused"]
        refused_jobs[:] = sorted(refused, key=lambda job: (len(job), job))
        try:
            written = write_report(sweep_dir)
        except GenlabError as err:
            log.warning("No sweep report: %s", err)
            return
        jobs = find_jobs(sweep_dir)
        unfinished = [job for job in jobs if job.status != "completed"]
        log.info("Sweep report: %s (%d files)", written[1], len(written))
        if unfinished:
            log.warning(
                "%d of %d jobs did not complete: %s",
                len(unfinished),
                len(jobs),
                ", ".join(f"{job.folder.name} ({job.status})" for job in unfinished),
            )
