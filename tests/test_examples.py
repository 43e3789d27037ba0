"""Every lesson exercise in examples/lesson runs offline and prints the output its documentation shows
(docs/exercises.md and the Turkish docs/tr/alistirmalar.md). Timings, printed after a "~", may differ. Figures
that come out of training are written "≈0.95" in the docs and may differ by the tolerance the marker states
(`<!-- expected-output: SCRIPT tolerance=0.05 -->`): another CPU rounds differently and training amplifies it.
What a trained exercise claims (the loss falls, accuracy rises in both languages) is checked on every seed."""

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
MARKER = re.compile(r"<!-- expected-output: (\S+)(?: tolerance=([0-9.]+))? -->\n```text\n(.*?)\n```", re.DOTALL)
SCRIPTS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "examples" / "lesson").glob("[0-9]*.py"))
NUMBER = r"-?[0-9]+(?:\.[0-9]+)?"
APPROXIMATE = re.compile(f"≈({NUMBER})")


def normalise(text: str) -> str:
    """Timings (a number after "~", with the padding before it) become "~N"; trailing spaces go."""
    text = re.sub(r"\s*~[0-9.]+", " ~N", text)
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def documented(doc: Path) -> dict[str, tuple[str, float | None]]:
    """script -> (expected output, tolerance of its "≈" figures or None)."""
    return {script: (text, float(tolerance) if tolerance else None)
            for script, tolerance, text in MARKER.findall(doc.read_text())}


def differences(expected: str, output: str, tolerance: float | None) -> list[str]:
    """What differs between the documented and the printed output: [] when they agree. A "≈x" figure in the
    documentation matches a printed number within `tolerance`; everything else must be identical."""
    expected, output = normalise(expected), normalise(output)
    parts = APPROXIMATE.split(expected)  # literal, figure, literal, figure, ..., literal
    pattern = "".join(f"({NUMBER})" if i % 2 else re.escape(part) for i, part in enumerate(parts))
    found = re.fullmatch(pattern, output)
    if found is None:
        return [f"the text differs:\n--- documented\n{expected}\n--- printed\n{output}"]
    if parts[1::2] and tolerance is None:
        return ["the documentation has ≈ figures but its marker states no tolerance=..."]
    return [f"printed {printed}, documented ≈{figure} (tolerance {tolerance})"
            for figure, printed in zip(parts[1::2], found.groups(), strict=True)
            if abs(float(printed) - float(figure)) > tolerance + 1e-9]


def trained(script: str) -> bool:
    """An exercise whose output holds trained figures (the English documentation marks them with ≈)."""
    return "≈" in documented(DOCS[0])[script][0]


@functools.cache
def run(script: str, seed: int = 0) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, script, "--seed", str(seed)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"{script} failed:\n{result.stderr[-3000:]}"
    return result.stdout


def check_documented(script: str, output: str) -> None:
    for doc in DOCS:
        expected, tolerance = documented(doc)[script]
        problems = differences(expected, output, tolerance)
        assert not problems, f"{doc.relative_to(ROOT)}: {script}: " + "\n".join(problems)


def test_every_exercise_is_documented_in_both_languages():
    assert len(SCRIPTS) == 5
    for doc in DOCS:
        assert sorted(documented(doc)) == SCRIPTS, f"{doc.name} documents {sorted(documented(doc))}"
        for script in SCRIPTS:  # both languages mark the same figures as trained, with the same tolerance
            assert documented(doc)[script][1] == documented(DOCS[0])[script][1], (doc.name, script)
            assert APPROXIMATE.findall(documented(doc)[script][0]) == APPROXIMATE.findall(
                documented(DOCS[0])[script][0]), (doc.name, script)


@pytest.mark.parametrize("script", [s for s in SCRIPTS if not trained(s)])
@pytest.mark.slow
def test_exercise_prints_what_the_docs_say(script):
    check_documented(script, run(script))


# What each trained exercise teaches, read from its output; checked on every seed. The margins clear the spread
# measured over CPU profiles and seeds 0-4 (scripts/trained_spread.py -k exercise, in the issue-11 note).
CLAIMS = {
    "examples/lesson/03_train_connector.py": re.compile(
        rf"held-out caption loss: (?P<before>{NUMBER}) before, (?P<after>{NUMBER}) after"),
    "examples/lesson/05_turkish_alignment.py": re.compile(
        rf"(?P<language>en|tr): held-out accuracy (?P<before>{NUMBER}) before, (?P<after>{NUMBER}) after "
        rf"\(chance (?P<chance>{NUMBER})"),
}


@pytest.mark.trained
@pytest.mark.parametrize("script", sorted(CLAIMS))
@pytest.mark.slow
def test_trained_exercise_teaches_what_the_docs_say(script, trained_seed, trained_figure):
    output = run(script, trained_seed)
    found = [m.groupdict() for m in CLAIMS[script].finditer(output)]
    assert found, f"{script} printed no line the claim reads:\n{output}"
    for claim in found:
        before, after = float(claim["before"]), float(claim["after"])
        if "language" not in claim:  # 03: the frozen LLM learns to caption from the projector
            trained_figure("loss_ratio", after / before)
            assert after < 0.75 * before, claim
        else:  # 05: both languages end well above chance, far above where they started
            chance, language = float(claim["chance"]), claim["language"]
            trained_figure(f"{language}/after", after)
            trained_figure(f"{language}/gain", after - before)
            assert after >= chance + (1 - chance) / 2, claim
            assert after - before > 0.4, claim
    if trained_seed == 0:
        check_documented(script, output)


def test_differences_forgive_only_timings_and_stated_tolerances():
    assert normalise("prefill   ~12.5  x") == normalise("prefill ~3.0  x")
    assert differences("loss 0.946", "loss 0.947", None)
    assert not differences("loss ≈0.946 at step 1", "loss 0.990 at step 1", 0.05)
    assert differences("loss ≈0.946 at step 1", "loss 0.997 at step 1", 0.05) == [
        "printed 0.997, documented ≈0.946 (tolerance 0.05)"]
    assert differences("loss ≈0.946 at step 1", "loss 0.946 at step 2", 0.05)  # only the ≈ figure may move
    assert differences("loss ≈0.946", "loss 0.946", None)  # a ≈ figure needs a stated tolerance
