"""G11 (modules, finetuning): the slope gate on synthetic series, the surgery options of the plan."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from gradsparse.data import DataInfo
from gradsparse.factory import bare_model, finetune_start
from theory_checks import g11_modules_finetune as g11
from theory_checks.context import lm_config


def test_window_drift_of_a_line_is_slope_times_span():
    s = np.arange(0, 1201, 50.0)
    v = 0.3 - 2e-5 * s
    # last third: steps >= 800 -> 800..1200, span 400
    assert g11.window_drift(s, v) == pytest.approx(-2e-5 * 400, rel=1e-9)


def test_window_drift_ignores_the_early_fall_and_sees_a_late_plateau():
    s = np.arange(0, 1201, 50.0)
    v = np.where(s < 700, 0.4 - 1e-4 * s, 0.33)
    assert abs(g11.window_drift(s, v)) < 1e-12
    rng = np.random.default_rng(0)
    noisy = [g11.window_drift(s, 0.3 + 0.002 * rng.standard_normal(s.size)) for _ in range(200)]
    assert abs(np.mean(noisy)) < 0.001  # noise alone: no systematic drift
    assert np.mean(np.abs(noisy)) < g11.MAX_DRIFT  # and, at this noise, under the gate


def test_window_drift_validates():
    with pytest.raises(ValueError, match="equal length"):
        g11.window_drift([0, 1, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="need >= 2"):
        g11.window_drift([0, 10, 100], [0.1, 0.2, 0.3], frac=0.05)


def test_plan_surgery_options_are_those_finetune_start_records():
    p = g11.CHECK.params("smoke")
    cfg = g11.finetune_config("smoke", p)
    model = bare_model(lm_config("smoke"), DataInfo("text", (cfg.seq_len,), 256), jax.random.PRNGKey(3))
    _, opts = finetune_start(model, cfg, **g11.MODULE_OPTS, t_up=g11.ramp_steps(p), t_mix=g11.ramp_steps(p))
    _, ctrl = finetune_start(model, cfg)
    arms = {a.name: a for a in g11.CHECK.make_plan("smoke").arms}
    assert arms["modules"].config["surgery"] == opts
    assert arms["control"].config["surgery"] == ctrl
    assert arms["modules"].start == "vanilla" and arms["control"].start == "vanilla"


def test_plan_protocol():
    for preset in ("quick", "standard", "full"):
        p = g11.CHECK.params(preset)
        pl = g11.CHECK.make_plan(preset)
        arms = {a.name: a for a in pl.arms}
        assert pl.seeds == 5
        assert arms["control"].config["lr"] == arms["vanilla"].config["lr"]  # the paper: the pretraining lr
        assert g11.ramp_steps(p) == p["finetune_steps"] // 3
        assert {g.name for g in pl.gates} == {"vanilla_loss_fall", "control_settled"}
        assert pl.part("lower_than_control").delta == pytest.approx(0.016 / 2)
        assert pl.part("quality_kept").kind == "margin"
