"""The command line: one-line errors with exit 2 and nothing written; a tiny successful run."""

import json

import pytest

from gradsparse.cli import main


@pytest.mark.parametrize("argv,needle", [
    (["--activation", "swish"], "unknown activation"),
    (["--steps", "-5"], "steps"),
    (["--model", "vit", "--data-path", "/nonexistent/fashion"], "apt-get install dataset-fashion-mnist"),
    (["--model", "lm", "--data-path", "/nonexistent.txt"], "does not exist"),
    (["--width", "0"], "width"),
    (["--config", "/nonexistent.json"], "does not exist"),
])
def test_bad_arguments_exit_2_nothing_written(tmp_path, capsys, argv, needle):
    out = tmp_path / "run"
    code = main(["train", *argv, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert needle in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", "rnn", "--out", "x"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["train", "--steps", "ten", "--out", "x"])
    assert e.value.code == 2


def test_train_command_writes_run(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--steps", "30", "--width", "16", "--depth", "1", "--log-every", "10", "--out", str(out),
                 "--quiet"])
    assert code == 0
    assert "density" in capsys.readouterr().out
    assert len((out / "log.jsonl").read_text().splitlines()) == 4
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["test_accuracy"] <= 1
    # a second run into the same folder is refused without --overwrite
    assert main(["train", "--steps", "30", "--out", str(out), "--quiet"]) == 2


# ------------------------------------------------------------------------------------------ flags and help
def test_every_flag_of_every_subcommand_has_help_and_a_default(capsys):
    import argparse

    from gradsparse.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0]  # argparse keeps its subcommands there
    for name, p in sub.choices.items():
        text = p.format_help()
        for a in p._actions:
            if not a.option_strings or a.dest == "help":
                continue
            assert (a.help or "").strip(), (name, a.option_strings)
            if a.nargs != 0:
                line = p._get_formatter()._get_help_string(a)
                assert "default" in line or "(required)" in line, (name, a.option_strings, line)
        assert isinstance(p, argparse.ArgumentParser) and text


def test_mistyped_and_abbreviated_flags_are_refused_with_a_suggestion(tmp_path, capsys):
    from gradsparse.cli import main

    out = tmp_path / "run"
    assert main(["train", "--stpes", "100", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "gradsparse train: error: unrecognized argument: --stpes (did you mean --steps?)" in err
    assert "usage: gradsparse train --out OUT [flags]" in err and ", 100" not in err
    # no prefix matching: --step is not --steps
    assert main(["train", "--step", "100", "--out", str(out)]) == 2
    assert "did you mean --steps?" in capsys.readouterr().err
    assert not out.exists()


def test_top_level_help_imports_no_subcommand():
    import subprocess
    import sys

    code = ("import sys; from gradsparse.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('JAX', 'jax' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "COMMAND" in r.stdout and "JAX False" in r.stdout, r.stdout + r.stderr


def test_check_refuses_a_folder_of_someone_elses_files(tmp_path, capsys):
    """`check --out` into a non-empty folder that holds no report (user files, a training run) is
    refused before anything is written; the report's own files do not count as foreign."""
    from gradsparse.commands.check import foreign_entries

    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    (user / "config.json").write_text("{}")
    assert main(["check", "G2", "--preset", "smoke", "--quiet", "--out", str(user)]) == 2
    err = capsys.readouterr().err
    assert "holds no check report (config.json, notes.txt)" in err and "--overwrite" in err
    assert sorted(p.name for p in user.iterdir()) == ["config.json", "notes.txt"]
    own = tmp_path / "report"
    (own / "runs").mkdir(parents=True)
    for name in ("plan.json", "G4.error.txt", ".report.json.1234.tmp"):
        (own / name).write_text("")
    assert foreign_entries(own) == [] and foreign_entries(tmp_path / "missing") == []


def test_figures_refuses_an_out_folder_of_other_files(tmp_path, capsys):
    """`figures --out` into a folder holding more than figures is refused before anything is drawn
    or trained; PNG/PDF files, figures.json and the --work report inside it are a figure folder's own."""
    from gradsparse.commands.figures import foreign_figure_entries

    out = tmp_path / "figs"
    out.mkdir()
    (out / "a.png").write_bytes(b"")
    (out / "figures.json").write_text("{}")
    (out / "check").mkdir()
    assert foreign_figure_entries(out, out / "check") == []
    assert foreign_figure_entries(out) == ["check"]
    (out / "thesis.tex").write_text("keep me")
    assert main(["figures", "--from", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds files that are not figures (check, thesis.tex)" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "check", "figures.json", "thesis.tex"]
