"""The `kopru` command line: commands, flags typed from the config dataclasses' field types, errors."""

from __future__ import annotations

import argparse
import enum
import subprocess
import sys
from typing import Any, Literal

import pytest

from kopru.cli import build_parser, flag_type, main
from kopru.convert import CONVERTERS
from kopru.export import TARGETS


def _commands() -> dict[str, argparse.ArgumentParser]:
    (subparsers,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(subparsers.choices)


def _helps() -> dict[str, str]:
    (subparsers,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {action.dest: action.help for action in subparsers._choices_actions}


def test_every_command_has_a_help_line_and_its_own_help(capsys):
    helps = _helps()
    assert set(helps) == set(_commands()) and len(helps) >= 10
    for name, text in helps.items():
        assert text, f"`kopru {name}` has no help line"
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: kopru {name}")


@pytest.mark.slow
def test_module_entry_point_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "kopru.cli", "--help"], capture_output=True, text=True, check=True)
    for name, text in _helps().items():
        assert name in out.stdout and text.split()[0] in out.stdout, name


def test_convert_and_export_offer_exactly_their_registries(capsys):
    # The formats come from the registries: a converter or export target added there is a CLI choice.
    commands = _commands()
    (source,) = [a for a in commands["convert"]._actions if a.dest == "source_format"]
    (target,) = [a for a in commands["export"]._actions if a.dest == "target"]
    assert list(source.choices) == sorted(CONVERTERS) and len(CONVERTERS) >= 4
    assert list(target.choices) == sorted(TARGETS) and len(TARGETS) >= 1
    with pytest.raises(SystemExit) as exit_:
        main(["convert", "--from", "gpt4", "a", "b"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'gpt4'" in err and all(name in err for name in CONVERTERS)


def test_convert_reports_a_missing_source(tmp_path, capsys):
    assert main(["convert", "--from", "llava", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "nope" in err
    assert not (tmp_path / "out").exists()


def _train_flags(*argv: str) -> dict[str, Any]:
    """The TrainConfig fields `kopru train ARGV` sets (flags not given leave nothing behind)."""
    from kopru.cli import _train_fields

    args = build_parser().parse_args(["train", *argv])
    return {name: getattr(args, name) for name in _train_fields() if hasattr(args, name)}


def test_train_feature_layer_takes_an_int_or_a_json_list():
    # Before: flags were typed by string-matching the annotation, and `int | list[int]` became int.
    assert _train_flags("--feature-layer", "[-2,-1]") == {"feature_layer": [-2, -1]}
    assert _train_flags("--feature-layer", "-2") == {"feature_layer": -2}
    assert _train_flags() == {}


@pytest.mark.parametrize("text", ["[-2,x]", "[-2,1.5]", "last", '{"a": 1}', "[true]"])
def test_train_feature_layer_refuses_what_is_neither(text, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["train", "--feature-layer", text])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --feature-layer: expected int | list[int] (JSON, e.g. '[-2,-1]'), found {text!r}" in err


def test_train_flags_follow_each_field_type():
    assert _train_flags("--eval-questions", "none", "--bf16", "no", "--lr", "3e-4", "--languages", '["tr"]',
                        "--lora", '{"r": 8}', "--vision", "none", "--max-grad-norm", "2") == {
        "eval_questions": None, "bf16": False, "lr": 3e-4, "languages": ["tr"], "lora": {"r": 8},
        "vision": None, "max_grad_norm": 2.0}
    assert _train_flags("--strategy", "none") == {"strategy": "none"}  # not optional: the text itself


@pytest.mark.parametrize(("flag", "text", "expected"), [
    ("--max-steps", "1.5", "expected int, found '1.5'"),
    ("--bf16", "maybe", "expected bool | none, found 'maybe'"),
    ("--languages", "en", "expected list[str] (JSON, e.g. '[-2,-1]'), found 'en'"),
    ("--lr", "nan", "expected float, found 'nan'"),
])
def test_train_flag_errors_name_the_type_and_the_text(flag, text, expected, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", flag, text])
    assert f"argument {flag}: {expected}" in capsys.readouterr().err


class _Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


@pytest.mark.parametrize(("hint", "text", "value"), [
    (tuple[int, ...], "[1, 2, 3]", (1, 2, 3)),
    (tuple[int, str], '[1, "a"]', (1, "a")),
    (Literal["fixed", "anyres"], "anyres", "anyres"),
    (_Colour, "blue", _Colour.BLUE),
    (_Colour, "RED", _Colour.RED),
    (int | None, "none", None),
    (float | None, "0.5", 0.5),
    (dict[str, int], '{"a": 1}', {"a": 1}),
])
def test_flag_type_reads_each_kind_of_annotation(hint, text, value):
    assert flag_type(hint)(text) == value


@pytest.mark.parametrize(("hint", "text", "message"), [
    (tuple[int, ...], "[1, 2.5]", "expected tuple[int, ...] (JSON, e.g. '[-2,-1]'), found '[1, 2.5]'"),
    (tuple[int, str], "[1]", "expected tuple[int, str]"),
    (Literal["fixed", "anyres"], "tiled", "expected one of 'fixed', 'anyres', found 'tiled'"),
    (_Colour, "green", "expected one of 'red', 'blue', found 'green'"),
    (dict[str, int], '{"a": "b"}', "expected dict[str, int]"),
])
def test_flag_type_names_what_it_expected(hint, text, message):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError) as error:
        flag_type(hint)(text)
    assert message in str(error.value)


def test_cli_prints_the_error_without_a_traceback(llm_dirs, tmp_path, capsys):
    assert main(["convert", "--from", "blip2", str(llm_dirs["llama"]), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "expects a checkpoint of model_type 'blip-2', found 'llama'" in err
    assert "Traceback" not in err
