#!/usr/bin/env bash
# Run the four CPU ablation sweeps of docs/ablations.md (or resume them where they stopped),
# committing each sweep dir under results/ablations/ after every finished run, so that a session
# that ends keeps every run it finished. Then `python scripts/results_page.py` rebuilds the page.
#
#   export LAVIT_LOCAL_DATASETS=uoft-cs/cifar10=../shared/data/cifar10   # {train,test}.parquet
#   scripts/run_ablations.sh                     # all four sweeps, two 1-thread runs at a time
#   scripts/run_ablations.sh va_layers dp_loss   # some of them
#   SLOTS=cpu scripts/run_ablations.sh           # one run at a time (all cores)
#   COMMIT=0 scripts/run_ablations.sh            # no commits
#
# Protocol (experiments/ablation_cifar10.yaml on top of base.yaml, chosen by the pilot in
# sweeps/pilot/): one pass over CIFAR-10's 50,000 training images, validation on all 10,000 test
# images. The sweep dirs keep checkpoints and W&B files locally; results/ablations/.gitignore
# keeps them out of git.
set -euo pipefail
cd "$(dirname "$0")/.."

export PYTHON=${PYTHON:-python}  # exported: the --after-run hook uses it
SLOTS=${SLOTS:-cpu,cpu}  # 2 cores: two 1-thread runs are ~1.2x one 2-thread run (docs/benchmarks.md)
COMMIT=${COMMIT:-1}
CONFIGS=(--config experiments/base.yaml --config experiments/ablation_cifar10.yaml)
SWEEPS=("$@")
[ ${#SWEEPS[@]} -gt 0 ] || SWEEPS=(va_layers residual_downsample la_init_state dp_loss)

for name in "${SWEEPS[@]}"; do
  if [ ! -f "sweeps/$name.yaml" ]; then
    echo "error: no sweep file sweeps/$name.yaml (sweeps: $(cd sweeps && ls -- *.yaml | sed 's/\.yaml$//' | tr '\n' ' '))" >&2
    exit 2
  fi
done

hook=()
if [ "$COMMIT" = 1 ]; then
  if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    echo "error: not in a git checkout: run with COMMIT=0, or from a clone of the repository" >&2
    exit 2
  fi
  # After each run: docs/ablations.md regenerated (so that every commit passes its staleness
  # test), then only it and the results are committed (`git commit -- <paths>`), whatever else is staged.
  # Retried, as another git command may hold the index lock for a moment.
  hook=(--after-run '"$PYTHON" scripts/results_page.py || exit 1
    for try in 1 2 3 4 5; do
      git add -- results/ablations docs/ablations.md &&
      git commit -q --no-verify -m "ablations: $(basename "$LAVIT_SWEEP_DIR") $LAVIT_SWEEP_RUN $LAVIT_SWEEP_RUN_STATE" -- results/ablations docs/ablations.md &&
      exit 0; sleep 3; done; exit 1')
fi

for name in "${SWEEPS[@]}"; do
  echo "== $name"
  "$PYTHON" -m lavit sweep "sweeps/$name.yaml" --sweep-dir "results/ablations/$name" \
    "${CONFIGS[@]}" --devices "$SLOTS" "${hook[@]}"
done
echo "done: python scripts/results_page.py  (rebuilds docs/ablations.md)"
