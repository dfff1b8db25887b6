#!/usr/bin/env bash
# GPU check (issue 17): one command that turns a GPU machine's minutes into verified numbers.
#
#   scripts/gpu_check.sh                        # install as the README does (.venv, constraints.txt), then check
#   scripts/gpu_check.sh --python python3       # use an environment that already holds torch (no install)
#   scripts/gpu_check.sh --python python3 --wheels .whl   # ... plus the packages it lacks, carried as wheels
#   scripts/gpu_check.sh --fetch-wheels .whl    # on a machine with a registry: download those wheels first
#
# Then, within --budget seconds (default 480): pytest -m cuda (tests/test_cuda.py, a missing GPU
# or any failure fails the check), `lavit bench --device cuda` at 224², batch 128 in bf16, fp32 with
# TF32 and compiled bf16, and a 2-minute bf16-mixed `lavit fit` of experiments/base.yaml (images/s,
# the data loader's share of the step). Without a CUDA device it says so in one line, skips those,
# and runs tiny CPU versions of the bench and fit commands. Exit code 1 if any step failed.
#
# Output: --out DIR, default $OUT when set, else runs/gpu_check/<UTC time>: summary.md,
# status.json, console.log, gpu_check_details.tar.gz, and the details unpacked in DIR/details.
# With $OUT (a folder that a lent machine sends back, a few files only) the details are packed
# only. More options: --budget SECONDS, --steps a,b (names in scripts/gpu_check.py).
#
# A machine without a package registry (the lent GPU machine here: an image with torch, timm,
# lightning, torchmetrics, pytest; no jsonargparse or datasets) cannot run the install: run
# --fetch-wheels where pip works, bring the folder along, and pass --python and --wheels there.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "gpu_check.sh: $*" >&2; exit 2; }

python="" wheels="" fetch="" out="" budget=480 steps=""
while (($#)); do
    case "$1" in
        --python) python="${2:?--python needs an interpreter}"; shift 2 ;;
        --wheels) wheels="${2:?--wheels needs a folder}"; shift 2 ;;
        --fetch-wheels) fetch="${2:?--fetch-wheels needs a folder}"; shift 2 ;;
        --out) out="${2:?--out needs a folder}"; shift 2 ;;
        --budget) budget="${2:?--budget needs seconds}"; shift 2 ;;
        --steps) steps="${2:?--steps needs names}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

# The packages lavit needs that the lent machine's image lacks, at this environment's versions,
# and timm, whose version there is unknown (lavit is tested with its floor, pyproject.toml).
WHEEL_PACKAGES=(jsonargparse docstring-parser typeshed-client datasets dill multiprocess timm)
if [[ -n $fetch ]]; then
    py="${python:-python3}"
    mapfile -t pinned < <("$py" - "${WHEEL_PACKAGES[@]}" <<'EOF'
import importlib.metadata as md, sys
for name in sys.argv[1:]:
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(name)
EOF
    )
    # CPython 3.12 on x86-64 Linux: the lent machine's interpreter (see --help).
    "$py" -m pip download --no-deps --only-binary=:all: --python-version "${GPU_PYTHON_VERSION:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$fetch" "${pinned[@]}"
    echo "gpu_check.sh: wheels in $fetch; there: scripts/gpu_check.sh --python python3 --wheels $fetch"
    exit 0
fi

[[ -z $python ]] || command -v "$python" >/dev/null || die "--python $python: no such interpreter"
pack=""
if [[ -z $out ]]; then
    if [[ -n ${OUT:-} ]]; then out="$OUT" pack=1; else out="runs/gpu_check/$(date -u +%Y%m%dT%H%M%SZ)"; fi
fi
mkdir -p "$out"
if [[ -n $pack ]]; then details="$(mktemp -d)/details"; else details="$out/details"; fi
mkdir -p "$details/logs"

if [[ -n $python ]]; then
    py="$python"
    if [[ -n $wheels ]]; then
        compgen -G "$wheels/*.whl" >/dev/null || die "--wheels $wheels: no .whl files there"
        site="$(mktemp -d)/site"
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
            "$wheels"/*.whl >"$details/logs/install.log" 2>&1 \
            || die "installing the wheels of $wheels failed: $details/logs/install.log"
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    # lavit from this checkout, whatever the environment has installed.
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    # The README's install: the pinned torch pair (a CUDA build) through constraints.txt.
    echo "gpu_check.sh: installing into .venv (log: $details/logs/install.log)"
    { [[ -x .venv/bin/python ]] || python3 -m venv .venv; } >"$details/logs/install.log" 2>&1
    .venv/bin/pip install -c constraints.txt -e '.[dev]' >>"$details/logs/install.log" 2>&1 \
        || die "install failed: $details/logs/install.log"
    py=.venv/bin/python
fi

exec "$py" scripts/gpu_check.py --out "$out" --details "$details" --budget "$budget" --steps "$steps"
