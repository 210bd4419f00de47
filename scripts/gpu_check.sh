#!/usr/bin/env bash
# genlab on a machine with an NVIDIA GPU, end to end, in about 5 minutes (each step has a
# time limit; all of them together, 15 minutes):
#
#   scripts/gpu_check.sh [output folder]     # default: outputs/gpu_check/<date>_<time>
#
#   1. installs what is missing: pip install -e '.[dev]', or, on a machine without
#      internet access, from the wheels in $GENLAB_WHEELS (pip download them elsewhere;
#      torch, torchvision, pytorch-lightning, tensorboard and matplotlib must be installed)
#   2. pytest -m gpu: each family on the GPU against the CPU, exact resume, the likelihood
#      on both devices, no host sync in a training step (tests/test_gpu.py)
#   3. the GPU rows of the benchmark: genlab against plain PyTorch on the same GPU
#   4. experiment=seed_vae_mnist trained on the GPU, end to end
#   5. genlab-eval eval.nll_samples=5000 of that run, on all 10,000 test images
#   6. fused sweeps against the basic launcher on the GPU (scripts/benchmark_fused.py:
#      16-job sweeps, the step, memory and epoch time of 1, 16 and 64 fused members)
#
# and writes summary.json and summary.md into the output folder, with each step's log.
# A step that fails is recorded and the others still run; the exit code is the number of
# failed steps. Data comes from $GENLAB_DATA_DIR (else ./data), as for every genlab command.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export GENLAB_CACHE_DIR=${GENLAB_CACHE_DIR:-$out/cache}
steps=()

# run NAME SECONDS COMMAND...: one step, its output in $out/NAME.log, its status remembered.
run() {
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== $name (at most $limit s)"
  timeout --signal=TERM --kill-after=20 "$limit" "$@" >"$out/$name.log" 2>&1
  local code=$?
  steps+=("$name $code $((SECONDS - start))")
  echo "   exit $code after $((SECONDS - start)) s; log: $out/$name.log"
  tail -n 3 "$out/$name.log" | sed 's/^/   | /'
}

install() {
  if python -c "import genlab, hydra, omegaconf, pytest, xdist" 2>/dev/null; then
    echo "genlab and its test tools are installed"
  elif [[ -n "${GENLAB_WHEELS:-}" ]]; then
    pip install --no-index --find-links "$GENLAB_WHEELS" \
      hatchling hydra-core omegaconf pytest pytest-xdist &&
      pip install --no-index --find-links "$GENLAB_WHEELS" --no-build-isolation --no-deps -e .
  else
    pip install -e '.[dev]'
  fi
  python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'; \
print(torch.__version__, torch.cuda.get_device_name(0))"
}

# A shell function cannot run under `timeout`: the install runs as a bash script of its own.
run install 300 bash -c "$(declare -f install); install"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$out/gpu.txt" 2>&1
run pytest_gpu 300 python -m pytest -m gpu -n 0 -p no:cacheprovider -rs \
  --junitxml="$out/pytest_gpu.xml" tests/test_gpu.py
run benchmark 120 python scripts/benchmark.py --device cuda --rounds 1 --epochs 3 \
  --out "$out/benchmark.md"
run seed_vae 90 genlab-train experiment=seed_vae_mnist trainer=gpu \
  trainer.enable_progress_bar=false hydra.run.dir="$out/seed_vae_mnist"
run nll_5000 90 genlab-eval ckpt_path="$out/seed_vae_mnist/checkpoints/last.ckpt" \
  eval.nll_samples=5000 eval.device=cuda hydra.run.dir="$out/seed_vae_mnist_eval"
run fused_sweeps 300 python scripts/benchmark_fused.py --device cuda --repeats 1 --epochs 1

printf '%s\n' "${steps[@]}" >"$out/steps.txt"
python - "$out" <<'EOF'
"""Collects the steps' results into summary.json and summary.md."""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])


def read_json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


steps = []
for line in (out / "steps.txt").read_text().splitlines():
    name, code, seconds = line.split()
    steps.append({"step": name, "exit_code": int(code), "seconds": int(seconds)})
summary = {"gpu": (out / "gpu.txt").read_text().strip(), "steps": steps}
try:
    suite = ET.parse(out / "pytest_gpu.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    summary["pytest_gpu"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
except (OSError, ET.ParseError, IndexError):
    summary["pytest_gpu"] = None
train = read_json(out / "seed_vae_mnist" / "metrics.json")
evaluation = read_json(out / "seed_vae_mnist_eval" / "metrics.json")
epochs = train.get("epochs") or 0
summary["seed_vae_mnist"] = {
    key: train.get(key) for key in ("status", "epochs", "wall_time_s", "test/neg_elbo")
}
summary["nll_5000"] = {
    key: evaluation.get(key)
    for key in ("test/nll", "test/neg_elbo", "test/fid", "test_examples", "eval_wall_time_s")
}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

lines = [f"# GPU check: {summary['gpu']}", "", "| step | exit code | seconds |", "|---|---|---|"]
lines += [f"| {s['step']} | {s['exit_code']} | {s['seconds']} |" for s in steps]
if summary["pytest_gpu"]:
    p = summary["pytest_gpu"]
    lines += ["", f"pytest -m gpu: {p['tests']} tests, {p['failures']} failed, "
              f"{p['errors']} errors, {p['skipped']} skipped."]
if train:
    per_epoch = f"{train['wall_time_s'] / epochs:.2f} s per epoch in all" if epochs else "no epochs"
    lines += ["", f"experiment=seed_vae_mnist: {train.get('status')}, {epochs} epochs, "
              f"{train.get('wall_time_s')} s ({per_epoch}), test -ELBO {train.get('test/neg_elbo')}."]
if evaluation:
    lines += [f"genlab-eval eval.nll_samples=5000: test NLL {evaluation.get('test/nll')} on "
              f"{evaluation.get('test_examples')} images in {evaluation.get('eval_wall_time_s')} s."]
if (out / "benchmark.md").is_file():
    lines += ["", "## Benchmark", "", (out / "benchmark.md").read_text()]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines[: 6 + len(steps)]))
EOF
failed=0
for s in "${steps[@]}"; do
  set -- $s
  [[ $2 == 0 ]] || failed=$((failed + 1))
done
echo "Summary: $out/summary.md ($failed failed steps)"
exit "$failed"
