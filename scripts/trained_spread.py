"""How far do the trained figures that tests assert on move across CPUs and seeds?

Runs the tests marked `trained` under each CPU profile (scripts/cpu_profile.py) with several seeds, collects
every figure they report through the `trained_figure` fixture, and prints, per figure, its range over all runs,
its range per profile, and the largest difference between two profiles at the same seed (what a user's CPU
alone changes). A test's margin must clear the whole range, not only the figure on the developer's machine.

    python scripts/trained_spread.py                       # seeds 0-4, all profiles (~30 min on 2 cores)
    python scripts/trained_spread.py --seeds 0-2 -k qformer --output runs/spread.md

Test failures are reported, not fatal: a failing seed is exactly what this is for.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_profile import PROFILES, profile_environment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_profile(profile: str, seeds: str, keyword: str | None, log: Path, workers: int) -> str:
    command = [sys.executable, "-m", "pytest", "-q", "-m", "trained", f"--trained-seeds={seeds}",
               "-p", "no:cacheprovider", "-n", str(workers), "tests"]
    if keyword:
        command += ["-k", keyword]
    environment = {**profile_environment(profile), "KOPRU_TRAINED_LOG": str(log)}
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    return lines[-1] if lines else result.stderr.strip()[-500:]


def table(records: list[dict]) -> str:
    by_figure: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in records:
        by_figure[record["test"], record["figure"]].append(record)
    profiles = sorted({r["profile"] for r in records}, key=list(PROFILES).index)
    header = ["test", "figure", "min", "max", *(f"{p} min-max" for p in profiles), "max CPU difference at a seed"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (test, figure), group in sorted(by_figure.items()):
        values = [r["value"] for r in group]
        per_profile = []
        for profile in profiles:
            mine = [r["value"] for r in group if r["profile"] == profile]
            per_profile.append(f"{min(mine):.4g}-{max(mine):.4g}" if mine else "")
        at_seed: dict[object, list[float]] = defaultdict(list)
        for r in group:
            at_seed[r["seed"]].append(r["value"])
        cpu = max(max(v) - min(v) for v in at_seed.values())
        rows.append(f"| {test} | {figure} | {min(values):.4g} | {max(values):.4g} | " + " | ".join(per_profile)
                    + f" | {cpu:.3g} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0-4", help="seeds for the tests that take one: '0-4', '0,3'")
    parser.add_argument("--profiles", default=",".join(PROFILES), help="comma-separated CPU profiles")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression: only these tests")
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers")
    parser.add_argument("--output", type=Path, help="also write the table (markdown) and the raw records here")
    args = parser.parse_args()

    records: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        for profile in args.profiles.split(","):
            log = Path(scratch) / f"{profile}.jsonl"
            log.touch()
            summary = run_profile(profile, args.seeds, args.keyword, log, args.workers)
            print(f"{profile}: {summary}", flush=True)
            records += [{**json.loads(line), "profile": profile} for line in log.read_text().splitlines()]
    report = table(records)
    print(report)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report + "\n")
        args.output.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
    main()
