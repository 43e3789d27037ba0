"""Every lesson exercise in examples/lesson runs offline and prints exactly the output its documentation shows
(docs/exercises.md and the Turkish docs/tr/alistirmalar.md); only timings, printed after a "~", may differ."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "docs" / "exercises.md", ROOT / "docs" / "tr" / "alistirmalar.md"]
MARKER = re.compile(r"<!-- expected-output: (\S+) -->\n```text\n(.*?)\n```", re.DOTALL)
SCRIPTS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "examples" / "lesson").glob("[0-9]*.py"))


def normalise(text: str) -> str:
    """Timings (a number after "~", with the padding before it) become "~N"; trailing spaces go."""
    text = re.sub(r"\s*~[0-9.]+", " ~N", text)
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def documented(doc: Path) -> dict[str, str]:
    return dict(MARKER.findall(doc.read_text()))


@functools.cache
def run(script: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{script} failed:\n{result.stderr[-3000:]}"
    return result.stdout


def test_every_exercise_is_documented_in_both_languages():
    assert len(SCRIPTS) == 5
    for doc in DOCS:
        assert sorted(documented(doc)) == SCRIPTS, f"{doc.name} documents {sorted(documented(doc))}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_exercise_prints_what_the_docs_say(script):
    output = normalise(run(script))
    for doc in DOCS:
        assert normalise(documented(doc)[script]) == output, f"{doc.relative_to(ROOT)}: {script} output differs"


def test_normalise_only_forgives_timings():
    assert normalise("prefill   ~12.5  x") == normalise("prefill ~3.0  x")
    assert normalise("loss 0.946") != normalise("loss 0.947")
