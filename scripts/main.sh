#!/usr/bin/env bash
# The main job on the embedded default: set-up (idempotent), a private local Ray cluster, the smoke
# evaluation submitted as a Ray Job (SmolLM2-135M: throughput, streamed perplexity and generation
# fidelity across KV policies), then the cluster is stopped. Results and report: out/eval/smoke/.
# Re-running resumes: finished cells are skipped. PRESET=ci runs the seconds-long test grid instead
# (tests/test_main_path.py does, with HOME set to an empty directory).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
PRESET=${PRESET:-smoke}
OUT=${OUT:-$PWD/out/eval/$PRESET}
export ADORE_RAY_DIR=${ADORE_RAY_DIR:-$PWD/out/ray}
eval "$(bash jobs/local_cluster.sh env)"  # the cluster's own token (no ~/.ray needed)
addr=$(bash jobs/local_cluster.sh start 2 | tail -1)
# Ray packages the job's working dir twice (to hash it, then to upload it): submit a snapshot of the
# code, so that a file written beside it meanwhile (this command's own log, say) cannot make the two
# differ ("Failed to download runtime_env file package").
stage=$(mktemp -d "${TMPDIR:-/tmp}/adore-job.XXXXXX")
trap 'bash jobs/local_cluster.sh stop >/dev/null 2>&1 || true; rm -rf "$stage"' EXIT
cp -r adore cluster jobs workers data pyproject.toml "$stage"/
find "$stage" -name __pycache__ -prune -exec rm -rf {} +
ray job submit --address "$addr" --working-dir "$stage" -- python jobs/eval_all.py --preset "$PRESET" --out "$OUT"
adore report "$OUT"
echo "report: $OUT/report/report.md"
