#!/usr/bin/env bash
# Regenerates every number and figure in docs/RESULTS.md: trains each named
# experiment under conf/experiment/, evaluates it with genlab-eval, then
# scripts/results.py draws docs/figures/ and prints the tables.
#
#   scripts/reproduce_results.sh                 # every stage, in order
#   scripts/reproduce_results.sh gan_mnist ...   # only the named stages
#
# Stages: seed_vae_mnist seed_vae_mnist_no_kl vae_mnist_nll vae_mnist_nll_30
# iwae_mnist_nll_30 cbernoulli_vae_mnist ae_fashion gan_mnist gan_fashion dcgan_mnist
# dcgan_fashion latent_beta_sweep figures, and iwae_mnist_nll (the full IWAE: hours on a
# CPU, so only when named). Runs go to $GENLAB_RESULTS_DIR
# (default outputs/results/<stage>/); each stage's wall time goes to
# <stage>/wall_time_s and the commit it ran at to <stage>/commit. Data comes from
# data.data_dir as usual ($GENLAB_DATA_DIR).
set -euo pipefail
out="${GENLAB_RESULTS_DIR:-outputs/results}"
all=(seed_vae_mnist seed_vae_mnist_no_kl vae_mnist_nll vae_mnist_nll_30 iwae_mnist_nll_30
  cbernoulli_vae_mnist ae_fashion gan_mnist gan_fashion dcgan_mnist dcgan_fashion latent_beta_sweep figures)

# train EXPERIMENT [OVERRIDE ...]; then evaluate EXPERIMENT [OVERRIDE ...]
train() {
  genlab-train experiment="$1" trainer.enable_progress_bar=false hydra.run.dir="$out/$1/run" "${@:2}"
}
evaluate() {
  genlab-eval ckpt_path="$out/$1/run/checkpoints/last.ckpt" hydra.run.dir="$out/$1/eval" "${@:2}"
}

stage() {
  case "$1" in
    seed_vae_mnist | seed_vae_mnist_no_kl | vae_mnist_nll | iwae_mnist_nll)
      train "$1" && evaluate "$1" eval.nll_samples=5000 ;;
    vae_mnist_nll_30 | iwae_mnist_nll_30)
      # The VAE and the IWAE (k = 50) of Burda et al.'s setup, 30 epochs each (the IWAE:
      # about an hour of one CPU core), the cosine schedule annealed over those 30.
      genlab-train experiment="${1%_30}" trainer.max_epochs=30 trainer.enable_progress_bar=false \
        hydra.run.dir="$out/$1/run" && evaluate "$1" eval.nll_samples=5000 ;;
    cbernoulli_vae_mnist)
      # The default VAE with the continuous Bernoulli decoder, on grey levels: its NLL is
      # a density of grey-level images (K = 1000: its 16-D codes make K = 5000 slow on a CPU).
      genlab-train model=vae model.recon_loss=cbernoulli data.binarize=none trainer.max_epochs=20 \
        trainer.enable_progress_bar=false hydra.run.dir="$out/$1/run" &&
        evaluate "$1" eval.nll_samples=1000 ;;
    ae_fashion | gan_mnist | gan_fashion | dcgan_mnist | dcgan_fashion)
      train "$1" && evaluate "$1" ;;
    latent_beta_sweep)
      # 16 jobs; the sweep report (summary.md, rate_distortion.png) lands in the sweep folder.
      genlab-train -m experiment=latent_beta_sweep trainer.enable_progress_bar=false \
        hydra.sweep.dir="$out/latent_beta_sweep" ;;
    figures)
      python "$(dirname "$0")/results.py" "$out" ;;
    *)
      echo "unknown stage '$1'; the stages are: ${all[*]} iwae_mnist_nll" >&2
      return 2 ;;
  esac
}

for name in "${@:-${all[@]}}"; do
  mkdir -p "$out/$name"
  git describe --always --dirty > "$out/$name/commit" 2>/dev/null || echo unknown > "$out/$name/commit"
  start=$(date +%s)
  stage "$name"
  echo $(($(date +%s) - start)) > "$out/$name/wall_time_s"
  echo "== $name: $(cat "$out/$name/wall_time_s") s"
done
