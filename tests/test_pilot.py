"""``python -m theory_checks.pilot``: a check's own run on pilot seeds (>= 1000), nothing judged."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from theory_checks import pilot as pilot_mod


def test_pilot_runs_the_check_on_the_pilot_seeds(monkeypatch):
    made = []
    real = tempfile.TemporaryDirectory

    def tracked(*a, **k):
        d = real(*a, **k)
        made.append(Path(d.name))
        return d

    monkeypatch.setattr(pilot_mod.tempfile, "TemporaryDirectory", tracked)
    res = pilot_mod.pilot("G1", "smoke", [1000, 1001])
    assert res["check"] == "G1" and res["seeds"] == [1000, 1001]
    assert res["parts"]
    for part in res["parts"].values():
        assert len(part["values"]) == 2
    assert made and not any(p.exists() for p in made)  # no --out: a temporary folder, removed at the end


def test_pilot_command_prints_json(capsys):
    assert pilot_mod.main(["G1", "--preset", "smoke", "--seeds", "1000", "1001"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert all(len(p["values"]) == 2 for p in res["parts"].values())


def test_pilot_refuses_test_seeds(capsys):
    with pytest.raises(ValueError):
        pilot_mod.pilot("G1", "smoke", [999, 1000])
    assert pilot_mod.main(["G1", "--preset", "smoke", "--seeds", "0", "1"]) == 2
    assert "1000" in capsys.readouterr().err
