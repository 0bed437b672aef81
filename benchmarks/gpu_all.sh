#!/usr/bin/env bash
# Every task's benchmark on full-size random weights (sd15-, sdxl-, pixart-, flux-, sd21-random),
# eager and torch.compile'd, on a GPU machine without network, within a time budget.
#
#   bash benchmarks/gpu_all.sh [BUDGET_SECONDS] [extra gpu_all.py options]
#   WHEELS=path/to/wheels bash benchmarks/gpu_all.sh 480
#
# If a wheel folder exists (WHEELS, default ./wheels), the project's requirements are installed
# from it only (pip --no-index --find-links: nothing is downloaded).  The install time counts
# against the budget (default 480 s = 8 minutes in all).  Results: one JSON line per run in
# outputs/gpu_all.jsonl (RESULTS to change); see benchmarks/gpu_all.py for the plan.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${1:-480}
shift || true
WHEELS=${WHEELS:-wheels}
PYTHON=${PYTHON:-python}
RESULTS=${RESULTS:-outputs/gpu_all.jsonl}

if [ -d "$WHEELS" ]; then
    if [ -f requirements.txt ]; then
        "$PYTHON" -m pip install --no-index --find-links "$WHEELS" -r requirements.txt
    else
        "$PYTHON" -m pip install --no-index --find-links "$WHEELS" "$WHEELS"/*.whl
    fi
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
SPENT=$(( $(date +%s) - START ))
exec "$PYTHON" benchmarks/gpu_all.py --budget "$BUDGET" --spent "$SPENT" --results "$RESULTS" "$@"
