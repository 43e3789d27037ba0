"""scripts/exists_diagnostic.py at a tiny size: its JSON's structure, and a property of the shipped encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def diagnostic(load_script):
    return load_script("scripts/exists_diagnostic.py")


def test_exists_diagnostic_small_run_reports_every_figure(diagnostic, tmp_path):
    out = tmp_path / "exists.json"
    returned = diagnostic.main(["--train-scenes", "40", "--test-scenes", "20", "--steps", "5",
                                "--features", "oracle", "--questions", "words", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result == json.loads(json.dumps(returned))
    # Two exists questions (en, tr) per scene.
    assert result["data"]["train_questions"] == 80 and result["data"]["test_questions"] == 40
    # Köprü's preprocessing of the shipped encoder is x / 255 * 2 - 1 on these 64x64 images (no resize).
    assert result["preprocessing_max_difference"] == 0
    probes = {(row["layer"], row["probe"]): row for row in result["probes"]}
    assert {layer for layer, _ in probes} == {-2, -1}
    assert {probe for _, probe in probes} == {"patch colour", "patch shape", "present(c,s) x12, max-pool",
                                             "exists read off present(c,s)"}
    for row in result["probes"]:
        assert 0 <= row["accuracy"] <= 1 and 0 < row["majority"] <= 1 and row["n_test"] > 0
    for layer in (-2, -1):
        colour = probes[(layer, "patch colour")]
        # The frozen encoder carries each patch's colour linearly: far above always naming the commonest colour
        # (a 4-way label; the full run measures ~0.999 against ~0.28).
        assert colour["accuracy"] > colour["majority"] + 0.4, colour
    (row,) = result["learn"]
    assert (row["features"], row["questions"], row["languages"], row["steps"]) == ("oracle", "words", "en+tr", 5)
    assert set(row["test"]) == {"all", "en", "tr"} and all(0 <= v <= 1 for v in row["test"].values())
    assert 0 <= row["train_accuracy"] <= 1 and 0.5 <= row["chance"] <= 1


def test_exists_diagnostic_refuses_an_unknown_setting_naming_the_known_ones(diagnostic, capsys):
    with pytest.raises(SystemExit) as exit_info:
        diagnostic.parse_args(["--features", "oracle,pixels"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--features expects a comma-separated subset of ['oracle', 'encoder']" in err and "'oracle,pixels'" in err
