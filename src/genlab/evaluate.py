"""genlab-eval: a checkpoint's metrics on the official test set of the data set it was trained on.

checkpoint -> model + the run's data config -> the family's metrics -> table + metrics.json

Which metrics a family gets:
    VAE  -ELBO, recon, KL (per latent dim too), active units, importance-sampled NLL and
         bits/dim; linear-probe and k-NN accuracy of its latent means; FID and IS of prior samples
    AE   reconstruction -log p(x|z) and per-pixel MSE; probe and k-NN; FID and IS of the
         samples its pictures show (decoded codes of a Gaussian fitted to its training codes)
    GAN  FID and IS (no encoder, no density: likelihood metrics do not apply)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from genlab import fid, metrics, runtime
from genlab.callbacks import FIT_POINTS
from genlab.checkpoints import load_model, trusted_prefixes
from genlab.config.validate import resolved, validate
from genlab.data import BINARIZE_SEED_EVAL, BINARIZE_SEED_TRAIN, binarize_sample
from genlab.errors import FolderTaken, GenlabError
from genlab.models import AE, VAE, GenerativeModel
from genlab.models.likelihood import likelihood_label, pixel_mean, reconstruction_nll
from genlab.options import Range, check_values, type_hints
from genlab.rundir import CONFIG_DIR, METRICS_FILE, owned, record_run, write_metrics

log = logging.getLogger(__name__)

# One line per metric for the printed table (and the README).
DESCRIPTIONS = {
    "test/neg_elbo": "-ELBO, nats/image (recon + kl)",
    "test/recon": "-log p(x|z), nats/image",
    "test/kl": "KL(q(z|x) || p(z)), nats/image",
    "test/nll": "-log p(x), importance-sampled, nats/image",
    "test/bpd": "test/nll in bits per pixel",
    "test/active_units": "latent dims with Cov_x(E_q[z_d]) > 0.01",
    "test/mse": "per-pixel squared error of reconstructions",
    "test/probe_acc": "logistic-regression probe on latent means",
    "test/knn_acc": "k-nearest-neighbour vote in latent space",
    "test/fid": "Frechet distance of samples to the test set (classifier features)",
    "test/fid_train_vs_test": "the same for training images: the floor",
    "test/is": "Inception-score analogue of samples (max 10)",
    "test/is_test_set": "the same for the test images: the ceiling",
}
_CLASSIFIER_CAVEAT = (
    "FID and IS use genlab's own {dataset} classifier ({accuracy:.2%} test accuracy), not "
    "Inception-v3: compare them only with each other, never with FID/IS published for papers."
)


@dataclass(frozen=True)
class EvalOptions:
    """How to evaluate: the ``eval`` options of conf/eval/default.yaml (genlab-eval), each
    described there, and of after_fit.yaml (genlab-train, ``eval.after_fit=true``)."""

    nll_samples: Annotated[int, Range(1)] = 1000
    num_samples: Annotated[int, Range(2)] = 10000
    test_examples: Annotated[int, Range(2, note="null: the whole test set")] | None = None
    batch_size: Annotated[int, Range(1)] = 8192
    knn_k: Annotated[int, Range(1)] = 10
    fid: bool = True
    classifier_epochs: Annotated[float, Range(0, exclusive=True)] = 3.0
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    after_fit: bool = False  # genlab-train: evaluate the tested weights after training

    def __post_init__(self) -> None:
        check_values(dataclasses.asdict(self), type_hints(type(self)), "eval")


@dataclass
class EvalData:
    """The official training and test sets in grey levels, and how the run binarised them."""

    dataset: str
    binarize: str  # the run's data.binarize
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    test_examples: int  # how many test images the metrics use (the first N)

    def inputs(self, split: str, binary: bool) -> Tensor:
        """Images of ``split`` as a model sees them: grey levels, or the data module's fixed binary sample."""
        images = self.train[0] if split == "train" else self.test[0]
        if binary:
            seed = BINARIZE_SEED_TRAIN if split == "train" else BINARIZE_SEED_EVAL
            images = binarize_sample(images, seed)
        return images if split == "train" else images[: self.test_examples]

    def labels(self, split: str) -> Tensor:
        return self.train[1] if split == "train" else self.test[1][: self.test_examples]


def load_data(data_cfg: DictConfig, test_examples: int | None, device: torch.device) -> EvalData:
    """The run's data set, whole: all 60000 training images (no validation split) and the test set."""
    # One order of the training images for every run, so that the classifier
    # trained on first use and the training images FID compares do not depend on the run.
    datamodule = instantiate(data_cfg, binarize="none", val_size=0, split_seed=0)
    datamodule.setup()
    train = tuple(t.to(device) for t in datamodule.splits["train"])
    test = tuple(t.to(device) for t in datamodule.splits["test"])
    n_test = len(test[0]) if test_examples is None else min(test_examples, len(test[0]))
    return EvalData(data_cfg.dataset, data_cfg.binarize, train, test, n_test)


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise GenlabError("eval.device=cuda, but no CUDA GPU is available; use auto or cpu.")
    return torch.device(name)


def _likelihood_binary(model: VAE | AE, data: EvalData) -> bool:
    # A Bernoulli decoder's -log p(x|z) is a likelihood in nats only for binary x; the
    # continuous Bernoulli and Gaussian decoders are densities of grey levels as they are.
    return model.recon_loss == "bce" or data.binarize != "none"


def _likelihood(model: VAE | AE, data: EvalData) -> dict[str, str]:
    """What the nats metrics measure: the decoder's likelihood and the pixels it scores."""
    binary = _likelihood_binary(model, data)
    return {
        "likelihood": likelihood_label(model.recon_loss, binary),
        "binarize": "static" if binary else "none",
    }


def _vae_metrics(
    vae: VAE, data: EvalData, options: EvalOptions, generator: torch.Generator
) -> dict[str, Any]:
    images = data.inputs("test", binary=_likelihood_binary(vae, data))
    recon, kl = metrics.elbo_terms(vae, images, options.batch_size, generator)
    nll = metrics.importance_sampled_nll(
        vae, images, options.nll_samples, options.batch_size, generator
    )
    kl_per_dim = kl.mean(0)
    return {
        "test/neg_elbo": (recon + kl.sum(1)).mean().item(),
        "test/recon": recon.mean().item(),
        "test/kl": kl_per_dim.sum().item(),
        "test/nll": nll.mean().item(),
        "test/bpd": metrics.bits_per_dim(nll.mean().item()),
        "test/active_units": metrics.active_units(vae.embed_all(images)),
        "test/kl_per_dim": [round(v, 4) for v in kl_per_dim.tolist()],
        **_likelihood(vae, data),
        "nll_samples": options.nll_samples,
    }


@torch.no_grad()
def _ae_metrics(ae: AE, data: EvalData, options: EvalOptions) -> dict[str, Any]:
    binary = data.binarize != "none"
    images = data.inputs("test", binary=binary)
    recon, mse = [], []
    for x in images.split(options.batch_size):
        logits = ae.decoder(ae.encoder(x))
        recon.append(reconstruction_nll(logits, x, ae.recon_loss))
        mse.append((pixel_mean(logits, ae.recon_loss) - x).pow(2).flatten(1).mean(1))
    return {
        "test/recon": torch.cat(recon).mean().item(),
        "test/mse": torch.cat(mse).mean().item(),
        "likelihood": likelihood_label(ae.recon_loss, binary),
        "binarize": "static" if binary else "none",
    }


def _code_metrics(model: VAE | AE, data: EvalData, options: EvalOptions) -> dict[str, float]:
    """Probe and k-NN accuracy of the codes (a VAE's: its posterior means)."""
    binary = data.binarize != "none"  # the images as the model was trained on them
    train_codes = model.embed_all(data.inputs("train", binary))
    test_codes = model.embed_all(data.inputs("test", binary))
    args = (train_codes, data.labels("train"), test_codes, data.labels("test"))
    return {
        "test/probe_acc": metrics.linear_probe_accuracy(*args),
        "test/knn_acc": metrics.knn_accuracy(*args, k=options.knn_k),
    }


def fit_images(model: GenerativeModel, data_cfg: DictConfig) -> Tensor | None:
    """For a family without a prior, the training images its Gaussian of codes is fitted
    to: those its pictures use (the first ``callbacks.images.fit_points`` of the run's
    training split), so that the samples scored are the samples shown."""
    if not model.fitted_prior:
        return None
    run_config = OmegaConf.create(model.run_config or {})
    count = OmegaConf.select(run_config, "callbacks.images.fit_points", default=None)
    datamodule = instantiate(data_cfg)
    datamodule.setup("fit")
    return datamodule.splits["train"][0][: count or FIT_POINTS].to(model.device)


def generated_images(
    model: GenerativeModel, n: int, generator: torch.Generator, data_cfg: DictConfig
) -> Tensor:
    """The ``n`` images FID and IS score: the model's samples, as its pictures draw them."""
    return model.sample(n, generator, model.code_gaussian(fit_images(model, data_cfg)))


def _generation_metrics(
    samples: Tensor, data: EvalData, options: EvalOptions, cache_dir: Path
) -> dict[str, Any]:
    batch_size = options.batch_size
    classifier, accuracy, path = fid.cached_classifier(
        cache_dir, data.dataset, options.classifier_epochs, data.train, data.test, batch_size
    )
    test_images = data.inputs("test", binary=False)
    distance = fid.ClassifierFID(classifier, test_images, batch_size)
    return {
        "test/fid": distance(samples),
        "test/fid_train_vs_test": distance(data.train[0][: len(samples)]),
        "test/is": fid.inception_score(classifier.logits(samples, batch_size)),
        "test/is_test_set": fid.inception_score(classifier.logits(test_images, batch_size)),
        "num_samples": len(samples),
        "classifier_accuracy": accuracy,
        "classifier_file": str(path),
    }


def evaluate_model(
    model: GenerativeModel, data_cfg: DictConfig, options: EvalOptions, cache_dir: str
) -> dict[str, Any]:
    """Evaluate ``model`` on the test set of the data ``data_cfg`` describes (the run's
    data config) as ``options`` say; returns the metrics."""
    start = time.perf_counter()
    runtime.keep_freed_memory()
    device = _device(options.device)
    model = model.to(device).eval()
    data = load_data(data_cfg, options.test_examples, device)
    generator = torch.Generator(device=device).manual_seed(options.seed)

    results: dict[str, Any] = {"model": type(model).__name__, "dataset": data.dataset}
    if isinstance(model, VAE):
        results.update(_vae_metrics(model, data, options, generator))
    if isinstance(model, AE):
        results.update(_ae_metrics(model, data, options))
    if isinstance(model, (VAE, AE)):
        results.update(_code_metrics(model, data, options))
    if options.fid:
        samples = generated_images(model, options.num_samples, generator, data_cfg)
        results.update(_generation_metrics(samples, data, options, Path(cache_dir).expanduser()))
    results.update(
        {
            "test_examples": data.test_examples,
            "train_binarize": data.binarize,
            "eval_seed": options.seed,
            "eval_wall_time_s": round(time.perf_counter() - start, 2),
        }
    )
    return results


def format_table(results: dict[str, Any]) -> str:
    """The metrics as aligned lines, with what each means and the caveats that apply."""
    lines = [f"{results['model']} on {results['dataset']}, {results['test_examples']} test images"]
    for key, meaning in DESCRIPTIONS.items():
        if key in results:
            lines.append(f"  {key:<24}{results[key]:>10.4g}   {meaning}")
    if "test/kl_per_dim" in results:
        per_dim = " ".join(f"{v:.2f}" for v in results["test/kl_per_dim"])
        lines.append(f"  KL per latent dim: {per_dim}")
    if "likelihood" in results:
        lines.append(f"  Nats metrics: the decoder's {results['likelihood']}.")
    if "test/nll" in results:
        lines.append(f"  (test/nll with K = {results['nll_samples']} importance samples)")
    if results.get("binarize") == "static" and results["train_binarize"] == "none":
        lines.append(
            "  Trained on grey levels: the nats metrics use the fixed binary sample of the test "
            "set (binarize=static in metrics.json)."
        )
    if results["model"] == "GAN":
        lines.append(
            "  A GAN has no encoder and no density: likelihood (nats) metrics do not apply."
        )
    if "classifier_accuracy" in results:
        accuracy = results["classifier_accuracy"]
        lines.append(
            "  " + _CLASSIFIER_CAVEAT.format(dataset=results["dataset"], accuracy=accuracy)
        )
    return "\n".join(lines)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """genlab-eval's work: load ``cfg.ckpt_path``, evaluate it, write metrics.json into the
    evaluation's own folder (one that holds no other results; see `refuse_used_folder`)."""
    if cfg.ckpt_path is None:
        raise GenlabError(
            "ckpt_path is required: genlab-eval ckpt_path=<run dir>/checkpoints/last.ckpt"
        )
    if not Path(cfg.ckpt_path).is_file():
        raise GenlabError(
            f"ckpt_path={cfg.ckpt_path!r} is not a file. Pass a checkpoint written by "
            f"genlab-train, e.g. ckpt_path=<run dir>/checkpoints/last.ckpt."
        )
    output_dir = Path(cfg.paths.output_dir)
    refuse_used_folder(output_dir)  # before the lock, which writes into the folder
    with owned(output_dir):
        refuse_used_folder(output_dir)  # again: another command may have written meanwhile
        validate(resolved(cfg, ("ckpt_path", "eval", "data", "paths"), "genlab-eval"))
        options = instantiate(cfg.eval)
        model = load_model(cfg.ckpt_path, trusted=trusted_prefixes(cfg.get("trusted_targets")))
        run_cfg = OmegaConf.create(model.run_config)
        if cfg.data.data_dir is not None:
            run_cfg.data.data_dir = cfg.data.data_dir
        record_run(output_dir, cfg)  # accepted: the folder is the evaluation's from here on
        results = {
            "checkpoint": str(Path(cfg.ckpt_path).resolve()),
            **evaluate_model(model, run_cfg.data, options, cfg.paths.cache_dir),
        }
        write_metrics(output_dir / METRICS_FILE, results)
    log.info("%s\nWritten to %s", format_table(results), output_dir / METRICS_FILE)
    return results


def refuse_used_folder(output_dir: Path) -> None:
    """Refuse an evaluation folder that holds results (of a training run, or an earlier
    evaluation): genlab-eval never overwrites what it did not write."""
    found = [
        name for name in (METRICS_FILE, CONFIG_DIR, "checkpoints") if (output_dir / name).exists()
    ]
    if found:
        raise FolderTaken(
            f"{str(output_dir)!r} already holds the results of another run ({', '.join(found)}); "
            f"genlab-eval writes only into a folder of its own. Leave hydra.run.dir at its "
            f"default (a new folder <run dir>/eval/<date>_<time> beside the evaluated run) or "
            f"name a new one."
        )
