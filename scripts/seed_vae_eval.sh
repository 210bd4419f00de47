#!/usr/bin/env bash
# Train the seed VAE (experiment=seed_vae_mnist) and evaluate it as papers do:
# importance-sampled NLL with K = 5000 on the whole MNIST test set, plus FID/IS.
# Prints the wall time of each stage. Usage: scripts/seed_vae_eval.sh [<output dir>]
set -euo pipefail
out="${1:-outputs/seed_vae_eval}"

start=$(date +%s)
genlab-train experiment=seed_vae_mnist trainer.enable_progress_bar=false hydra.run.dir="$out/run"
trained=$(date +%s)
genlab-eval ckpt_path="$out/run/checkpoints/last.ckpt" eval.nll_samples=5000 hydra.run.dir="$out/eval"
evaluated=$(date +%s)

echo "training: $((trained - start)) s; evaluation (K=5000, 10000 test images): $((evaluated - trained)) s"
echo "metrics: $out/eval/metrics.json"
