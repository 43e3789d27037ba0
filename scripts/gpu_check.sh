#!/usr/bin/env bash
# The GPU check: everything Köprü wants from a lent CUDA GPU (minutes at a time, no network, Köprü not
# installed), in one run that finishes in under 8 minutes and leaves every figure as JSON in OUT_DIR.
#
#   bash scripts/gpu_check.sh OUT_DIR         # on the GPU: pip install --no-deps -e ., then the steps below
#   bash scripts/gpu_check.sh --dry OUT_DIR   # on CPU: the same steps at tiny size, no install (CI's smoke test)
#
# Steps, each under its own `timeout` (their limits add up to 470 s), each one's output in OUT_DIR/STEP.log:
#   install        python -m pip install --no-deps --no-build-isolation -e .   (not in --dry)
#   cuda_tests     pytest -m cuda tests/test_cuda.py -> cuda_tests.xml (JUnit) and cuda_tests.json
#   generation_P   benchmarks/generation_benchmark.py --preset P, batch 1 and 8 -> generation_P.json, for P in
#                  llava-7b (with the compiled variants), blip2-7b and mllama-11b (eager only, to fit the time)
#   train          benchmarks/train_benchmark.py --preset llava-7b -> train.json  (--dry: --preset tiny, lengths 32-128)
# A failing step does not stop the others; OUT_DIR/summary.json records each step's command, exit code, seconds
# and whether it timed out, and the script exits 1 when any step failed (2 on a usage error).
#
# PYTHON (default: python on PATH) is the interpreter used; GPU_CHECK_THREADS (default 1) the torch CPU threads
# in --dry.
set -u

usage="usage: bash scripts/gpu_check.sh [--dry] OUT_DIR"
dry=0
if [ "${1:-}" = "--dry" ]; then
    dry=1
    shift
fi
if [ $# -ne 1 ] || [ -z "$1" ] || [ "${1#-}" != "$1" ]; then
    echo "$usage (expected one output folder, found: $*)" >&2
    exit 2
fi
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1" || exit 2
out=$(cd "$1" && pwd)
python=${PYTHON:-python}
threads=${GPU_CHECK_THREADS:-1}
cd "$root" || exit 2

# No model hub is reachable; whatever is imported must not try one.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The working tree's sources come first even if the install step fails (or, in --dry, is not run).
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"

steps_file="$out/steps.tsv"
: > "$steps_file"
failed=0
started=$(date +%s)

# step NAME LIMIT_SECONDS COMMAND...: runs COMMAND under `timeout`, output to NAME.log, one line in steps.tsv.
step() {
    local name=$1 limit=$2
    shift 2
    local begin end code timed_out=false
    begin=$(date +%s.%N)
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
    code=$?
    end=$(date +%s.%N)
    # 124: timeout stopped it; 137: it had to be killed after the grace period.
    if [ "$code" -eq 124 ] || [ "$code" -eq 137 ]; then
        timed_out=true
    fi
    [ "$code" -eq 0 ] || failed=1
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$code" "$begin" "$end" "$timed_out" "$*" >> "$steps_file"
    echo "   exit $code, $(awk -v b="$begin" -v e="$end" 'BEGIN { printf "%.1f", e - b }') s"
}

if [ "$dry" -eq 1 ]; then
    printf 'install\tskipped\t0\t0\tfalse\t--dry: nothing installed\n' >> "$steps_file"
    generation_options=(--tiny --skip-compiled --repeats 1 --threads "$threads")
    train_options=(--preset tiny --repeats 1 --lengths 32 128 --threads "$threads")
else
    step install 30 "$python" -m pip install --no-deps --no-build-isolation --no-input -e .
    generation_options=(--repeats 2)
    train_options=(--preset llava-7b --repeats 1)
fi

# -o addopts=: the project's addopts name pytest-xdist's --dist, and the lent machine may not have xdist.
step cuda_tests 90 "$python" -m pytest -o addopts= -m cuda tests/test_cuda.py -q -rs -p no:cacheprovider \
    --junitxml "$out/cuda_tests.xml"

for preset in llava-7b blip2-7b mllama-11b; do
    limit=60
    extra=()
    if [ "$dry" -eq 0 ] && [ "$preset" != llava-7b ]; then
        extra=(--skip-compiled)  # compiling takes about a minute a model; the time goes to llava-7b's
    elif [ "$dry" -eq 0 ]; then
        limit=120
    fi
    step "generation_$preset" "$limit" "$python" benchmarks/generation_benchmark.py --preset "$preset" \
        --batch 1 --batch 8 "${generation_options[@]}" "${extra[@]}" --json "$out/generation_$preset.json"
done

step train 110 "$python" benchmarks/train_benchmark.py "${train_options[@]}" --json "$out/train.json"

# summary.json (every step) and cuda_tests.json (the JUnit file's counts and each test's outcome).
"$python" - "$out" "$dry" "$started" <<'EOF'
import json
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

out, dry, started = Path(sys.argv[1]), sys.argv[2] == "1", float(sys.argv[3])
steps = []
for line in (out / "steps.tsv").read_text(encoding="utf-8").splitlines():
    name, code, begin, end, timed_out, command = line.split("\t", 5)
    figures = out / f"{name}.json"
    steps.append({"name": name, "exit_code": None if code == "skipped" else int(code),
                  "skipped": code == "skipped", "seconds": round(float(end) - float(begin), 1),
                  "timed_out": timed_out == "true", "command": command,
                  "log": f"{name}.log" if code != "skipped" else None,
                  "json": figures.name if figures.exists() else None})
junit = out / "cuda_tests.xml"
if junit.exists():
    cases = []
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", None
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                outcome, message = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind], \
                    found.get("message")
                break
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message})
    counts = {outcome: sum(case["outcome"] == outcome for case in cases)
              for outcome in ("passed", "failed", "error", "skipped")}
    (out / "cuda_tests.json").write_text(json.dumps({"tests": len(cases), **counts, "cases": cases}, indent=2,
                                                    ensure_ascii=False) + "\n", encoding="utf-8")
    for step in steps:
        if step["name"] == "cuda_tests":
            step["json"] = "cuda_tests.json"
failed = [step["name"] for step in steps if not step["skipped"] and step["exit_code"] != 0]
summary = {"dry": dry, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
           "seconds": round(time.time() - started, 1), "failed": failed, "steps": steps}
(out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
print(f"{len(steps)} steps in {summary['seconds']} s; failed: {', '.join(failed) or 'none'}; see {out}/summary.json")
EOF
[ $? -eq 0 ] || failed=1
exit "$failed"
