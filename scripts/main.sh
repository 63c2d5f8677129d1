#!/usr/bin/env bash
# The main job on the embedded default: set-up (idempotent), a private local Ray cluster, the smoke
# evaluation submitted as a Ray Job (SmolLM2-135M: throughput, streamed perplexity and generation
# fidelity across KV policies), then the cluster is stopped. Results and report: out/eval/smoke/.
# Re-running resumes: finished cells are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
OUT=${OUT:-$PWD/out/eval/smoke}
export ADORE_RAY_DIR=${ADORE_RAY_DIR:-$PWD/out/ray} RAY_AUTH_MODE=token
addr=$(bash jobs/local_cluster.sh start 2 | tail -1)
trap 'bash jobs/local_cluster.sh stop >/dev/null 2>&1 || true' EXIT
ray job submit --address "$addr" --working-dir . -- python jobs/eval_all.py --preset smoke --out "$OUT"
adore report "$OUT"
echo "report: $OUT/report.md"
