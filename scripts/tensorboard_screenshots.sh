#!/usr/bin/env bash
# Screenshots of TensorBoard's Scalars, Images and HParams tabs for one run (or a sweep's folder),
# taken by headless Chromium: the figure docs/figures/tensorboard_*.png comes from here.
#   scripts/tensorboard_screenshots.sh <run dir> <output folder> [port]
set -euo pipefail
logdir=${1:?usage: $0 <run dir> <output folder> [port]}
out=${2:?usage: $0 <run dir> <output folder> [port]}
port=${3:-6123}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome) || {
  echo "No Chromium found (Debian: apt-get install chromium)." >&2; exit 1; }
mkdir -p "$out"
tensorboard --logdir "$logdir" --port "$port" --host 127.0.0.1 >"$out/tensorboard.log" 2>&1 &
server=$!
trap 'kill $server' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$port" >/dev/null && break; sleep 1; done
# The Scalars tab filtered to the losses; the Images tab leads with the 2-D manifold when there is one.
for view in "scalars&tagFilter=loss" "images&tagFilter=manifold|latent|recon|samples" hparams; do
  tab=${view%%&*}
  "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,1000 \
    --virtual-time-budget=20000 --screenshot="$out/tensorboard_$tab.png" \
    "http://127.0.0.1:$port/?darkMode=false#$view" 2>/dev/null
done
echo "Screenshots in $out"
