"""The CLI's conventions: one exit-code table (README, every ``--help``), one error printer, usage errors exit
`ExitCode.BAD_INPUT`, defaults shown in ``--help``, ``--version``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipelines import cli
from pipelines.cli import EXIT_CODES_HELP, ExitCode

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("name", [None, *cli.COMMANDS])
def test_every_help_ends_with_the_exit_code_table(name: str | None, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--help"] if name else ["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == ExitCode.OK and out.rstrip().endswith(EXIT_CODES_HELP)
    assert "DESIGN" not in out


def test_the_table_names_every_code_in_help_and_readme() -> None:
    readme = README.read_text()
    section = readme[readme.index("### Exit codes") :]
    rows = re.findall(r"^\| (\d+) \|", section[: section.index("\n\n", section.index("| code |"))], re.M)
    assert [int(r) for r in rows] == [int(c) for c in ExitCode]
    assert [int(c) for c in re.findall(r"^  (\d+) ", EXIT_CODES_HELP, re.M)] == [int(c) for c in ExitCode]


def test_extract_keeps_the_accounting_contract() -> None:
    """docs/design.md §9 *Accounting*: 0 when every shard completed, 2 when any shard failed."""
    assert (ExitCode.OK, ExitCode.SHARDS_FAILED) == (0, 2)


@pytest.mark.parametrize(
    "argv",
    [["synth"], ["extract", "x.tar", "--out", "s", "--batch-size", "zero"], ["no-such-command"]],
)
def test_usage_errors_exit_bad_input(argv: list[str], capsys) -> None:
    """argparse's own code (2) would read as "some shards failed"."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == ExitCode.BAD_INPUT
    assert "error:" in capsys.readouterr().err


def test_fail_prints_one_line_in_argparse_form(capsys) -> None:
    assert cli.fail("inspect", ValueError("no store at x")) == ExitCode.BAD_INPUT
    assert cli.fail("train", "training failed", ExitCode.RUN_FAILED) == 3
    err = capsys.readouterr().err
    assert err == "regionflow inspect: error: no store at x\nregionflow train: error: training failed\n"


def test_bad_input_of_every_kind_exits_1(tmp_path: Path, capsys) -> None:
    """Commands that used to disagree (1 in import/export/inspect, 2 in synth/shards/visualize) agree now."""
    (tmp_path / "notes.txt").write_text("not a store")
    argvs = [
        ["inspect", str(tmp_path)],
        ["export", str(tmp_path), "--tsv", str(tmp_path / "x.tsv")],
        ["synth", "--out", str(tmp_path / "notes.txt"), "--images", "1", "--samples-per-shard", "1"],
        [
            "shards",
            "--images",
            str(tmp_path / "absent"),
            "--out",
            str(tmp_path / "o"),
            "--samples-per-shard",
            "1",
        ],
        ["visualize", str(tmp_path), "k", "--out", str(tmp_path / "k.jpg")],
    ]
    for argv in argvs:
        assert cli.main(argv) == ExitCode.BAD_INPUT, argv
        err = capsys.readouterr().err
        assert err.startswith(f"regionflow {argv[0]}: error: ") and err.count("\n") == 1, err


def test_help_shows_defaults_once(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["synth", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 128)" in out  # --min-side, argparse's default shown
    assert "(default: False)" not in out  # flags without a value to show
    assert "corpus seed (default 0)" in out and "(default 0) (default: 0)" not in out  # stated once


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_flag_with_a_value_shows_its_default(name: str, capsys) -> None:
    """Trial 1 item 18: defaults of 0 were hidden (``0 in (None, False)`` is true), e.g. ``train --warmup-steps``,
    ``--seed``, ``--max-steps``. A flag whose default is None, False or "" has no value to show."""
    import argparse

    parser = cli.build_parser(name)
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    sub = commands.choices[name]
    formatter = sub._get_formatter()
    for action in sub._actions:
        default = action.default
        if not action.option_strings or action.help == argparse.SUPPRESS or action.required:
            continue
        if default is None or default is False or default == "" or default is argparse.SUPPRESS:
            continue
        text = formatter._get_help_string(action) or ""
        assert "default" in text.lower(), (name, action.option_strings, default, text)
    with pytest.raises(SystemExit):
        cli.main([name, "--help"])
    if name == "train":
        out = " ".join(capsys.readouterr().out.split())
        for shown in (
            "then linear decay to 0 (default: 0)",
            "masking (default: 0)",
            "--epochs) (default: 0)",
        ):
            assert shown in out


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and re.fullmatch(r"regionflow \S+.*\n", capsys.readouterr().out)


def test_ctrl_c_is_one_line_and_exit_130(tmp_path: Path, monkeypatch, capsys) -> None:
    import pipelines.inspect

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(pipelines.inspect, "run", interrupted)
    assert cli.main(["inspect", str(tmp_path)]) == ExitCode.INTERRUPTED == 130
    assert capsys.readouterr().err == "regionflow inspect: error: interrupted (Ctrl-C)\n"
