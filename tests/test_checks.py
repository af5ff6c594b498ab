"""Theory checks (SPEC 5): verdict rules on synthetic numbers, check helpers against closed forms,
and every check end to end in the smoke preset through `gradsparse check`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gradsparse import cli
from theory_checks import context as common
from theory_checks import suite
from theory_checks.context import Context
from theory_checks.protocol import PRESETS, Check, Finding, Unavailable
from theory_checks.suite import get_checks
from theory_checks.verdicts import VERDICTS, Gate, Verdict, bound_verdict, combine, effect_verdict, gated, holm_rejections


# ------------------------------------------------------------------------------------------ verdict rules
def test_effect_verdict_pass_fail_inconclusive():
    v = effect_verdict([0.2, 0.3, 0.25], 0.1)
    assert (v.verdict, v.agree, v.n) == ("PASS", 3, 3) and v.lo > 0 and v.mean == pytest.approx(0.25)
    # right sign everywhere, tight, but the mean is below delta and the upper bound too: excluded
    v = effect_verdict([0.05, 0.06, 0.07], 0.1)
    assert v.verdict == "FAIL" and "exclude" in v.reason and v.hi < 0.1
    # right sign everywhere, mean below delta, spread too large to exclude delta
    v = effect_verdict([0.05, 0.08, 0.11], 0.1)
    assert v.verdict == "INCONCLUSIVE" and v.lo > 0 and v.hi > 0.1 and "mean below delta" in v.reason
    # a noisy null: the old majority-sign rule said FAIL, the bound rule cannot exclude delta
    v = effect_verdict([-0.1, -0.2, 0.3], 0.01)
    assert v.verdict == "INCONCLUSIVE" and v.hi > 0.01
    # a clear opposite effect is a FAIL, flagged as opposite
    v = effect_verdict([-1.0, -1.1, -0.9], 0.1)
    assert v.verdict == "FAIL" and "opposite sign" in v.reason
    # the MDE: (t_.95 + t_.80) SE with 2 degrees of freedom
    e = np.array([0.2, 0.3, 0.25])
    se = e.std(ddof=1) / math.sqrt(3)
    assert v.mde > 0 and effect_verdict(e, 0.1).mde == pytest.approx((2.919986 + 1.060660) * se, rel=1e-5)


def test_effect_verdict_needs_three_finite_seeds():
    v = effect_verdict([0.5, 0.6], 0.1)
    assert v.verdict == "INCONCLUSIVE" and "only 2 seed(s)" in v.reason
    v = effect_verdict([0.5, math.nan, 0.6], 0.1)
    assert v.verdict == "INCONCLUSIVE" and v.agree == 2 and "non-finite" in v.reason
    assert effect_verdict([0.5, 0.6], 0.1, min_seeds=2).verdict == "PASS"
    with pytest.raises(ValueError, match="delta"):
        effect_verdict([1, 2, 3], -0.1)
    with pytest.raises(ValueError, match="delta"):
        effect_verdict([1, 2, 3], 0.0)
    with pytest.raises(ValueError, match="sequence of numbers"):
        effect_verdict(["a", "b", "c"], 0.1)


def _rates(n, true, delta, se, sims=2000, seed=0):
    """Verdict rates of effect_verdict over ``sims`` simulated seed sets (normal, SE = sd/sqrt(n))."""
    e = np.random.default_rng(seed).normal(true, se * math.sqrt(n), (sims, n))
    vs = [effect_verdict(row, delta) for row in e]
    rate = {k: sum(v.verdict == k for v in vs) / sims for k in VERDICTS}
    rate["miss"] = sum(v.lo > true for v in vs) / sims  # the lower bound above the truth
    return rate


@pytest.mark.parametrize("n", [3, 5])
def test_effect_rule_error_rates_on_simulated_seeds(n):
    """The rule's guarantees on 2000 simulated seed sets per case (fixed generator seed)."""
    se, d = 1.0, 1.0
    null = _rates(n, 0.0, d, se)
    assert 0.035 <= null["miss"] <= 0.065            # one-sided 95% bound: coverage 5% +- 1.5%
    assert null["PASS"] <= 0.065                     # no effect -> PASS at most 6.5%
    assert _rates(n, d, d, se, seed=1)["FAIL"] <= 0.065        # effect exactly delta -> FAIL at most 6.5%
    assert _rates(n, 0.0, 4 * se, se, seed=2)["FAIL"] >= 0.80  # no effect, delta = 4 SE -> FAIL >= 80%
    assert _rates(n, -4 * se, 4 * se, se, seed=3)["FAIL"] >= 0.80  # effect -delta -> FAIL >= 80%
    assert _rates(n, 0.5 * se + 4 * se, 0.5 * se, se, seed=4)["PASS"] >= 0.80  # delta + 4 SE -> PASS >= 80%
    # underpowered (SE >= delta; truth between 0 and delta): mostly INCONCLUSIVE. At SE = delta and a
    # truth of delta/2 the rates are 0.81 (n = 3) and 0.78 (n = 5); at SE = 2 delta, 0.85 and 0.84.
    assert _rates(n, 0.25 * se, 0.5 * se, se, seed=5)["INCONCLUSIVE"] >= 0.80


def test_regime_gate_turns_a_verdict_inconclusive_with_its_numbers():
    v = effect_verdict([0.2, 0.3, 0.25], 0.1)
    ok = Gate("train_loss_ref", 0.3, ">=", 0.05, "plain SGD arm, mean over seeds")
    bad = Gate("train_loss_ref", 0.001, ">=", 0.05, "plain SGD arm, mean over seeds")
    assert ok.ok and not bad.ok and not Gate("x", float("nan"), "<", 1.0).ok
    assert gated(v, [ok]) is v
    g = gated(v, [ok, bad])
    assert g.verdict == "INCONCLUSIVE" and g.reason.startswith("regime not reached: train_loss_ref = 0.001")
    assert "would be PASS" in g.reason
    with pytest.raises(ValueError, match="op"):
        Gate("x", 1.0, "==", 1.0)


def test_bound_verdict_and_combine():
    ok = dict(passes=lambda v: v <= 1e-6, fails=lambda v: v > 1e-3, what="err", bound="<= 1e-6", fail_bound="> 1e-3")
    assert bound_verdict([1e-7, 2e-7, 1e-8], **ok).verdict == "PASS"
    assert bound_verdict([1e-2, 5e-2, 1e-8], **ok).verdict == "FAIL"
    v = bound_verdict([1e-5, 1e-7, 1e-7], **ok)
    assert (v.verdict, v.agree) == ("INCONCLUSIVE", 2)
    assert bound_verdict([1e-7, math.nan, 1e-7], **ok).verdict == "INCONCLUSIVE"
    p, f, i = Verdict("PASS", 3, 3, ""), Verdict("FAIL", 0, 3, "", kind="exact"), Verdict("INCONCLUSIVE", 2, 3, "")
    assert combine({"a": p, "b": p}).verdict == "PASS"
    assert combine({"a": p, "b": f, "c": i}).verdict == "FAIL"
    c = combine({"a": p, "b": i})
    assert c.verdict == "INCONCLUSIVE" and c.agree == 2
    # the primary part decides
    assert combine({"a": p, "b": f}, primary="a").verdict == "PASS"
    with pytest.raises(ValueError, match="primary"):
        combine({"a": p}, primary="z")
    # Holm: a borderline effect FAIL among several effect parts does not fail the check alone
    weak = effect_verdict([0.75, 0.8, 0.85], 1.0)   # p_fail small but not tiny
    strong = effect_verdict([-1.0, -1.01, -0.99], 1.0)
    assert weak.verdict == "FAIL" and 0.0025 < weak.p_fail < 0.05
    many = {f"x{k}": effect_verdict([0.5, 0.6, 0.7], 0.1) for k in range(20)}
    assert combine({**many, "weak": weak}).verdict == "INCONCLUSIVE"
    assert combine({**many, "strong": strong}).verdict == "FAIL"
    assert holm_rejections([0.01, 0.04, 0.03]) == [True, False, False]
    assert holm_rejections([0.01, 0.02, 0.03]) == [True, True, True]
    with pytest.raises(ValueError):
        combine({})
    with pytest.raises(ValueError, match="callables"):
        bound_verdict([1, 2, 3], passes=None, fails=None, what="x", bound="", fail_bound="")
    with pytest.raises(ValueError, match="verdict must be one of"):
        Verdict("MAYBE", 0, 3, "")


def test_check_registry_and_aliases():
    checks = get_checks()
    assert [c.name for c in checks] == [f"G{i}" for i in range(1, 22)]
    for c in checks:
        assert c.claim.strip() and c.rule.strip() and set(c.presets) == set(PRESETS)
    assert [c.name for c in get_checks(["g3", "G03", "3", "g03_sparsity_emerges", "G1"])] == ["G1", "G3"]
    with pytest.raises(ValueError, match="unknown check"):
        get_checks(["G42"])
    with pytest.raises(ValueError, match="unknown preset"):
        checks[0].params("huge")


# ------------------------------------------------------------------------------------------ helpers
def test_g08_bounds_on_known_spectra():
    from theory_checks.g08_kkt_bounds import band80, bound_stats

    lam = 2.0 ** np.arange(10)
    lo, hi = band80(lam)  # ceil(0.8 * 10) = 8 consecutive octaves: the narrowest window spans 2^7
    assert hi / lo == pytest.approx(2.0 ** 7)
    rng = np.random.default_rng(0)
    n, d = 12, 4
    K = rng.standard_normal((n, d))
    eta = rng.standard_normal((50, n))
    st = bound_stats(K, eta)
    assert st["sandwich_frac"] == 1.0 and st["tokens"] == 50
    # all singular values equal (K = 3 * orthonormal columns): rho_t = 9 exactly, always in the band
    q, _ = np.linalg.qr(rng.standard_normal((n, d)))
    st = bound_stats(3.0 * q, eta)
    assert st["band_frac"] == 1.0 and st["band_ratio"] == pytest.approx(1.0)
    assert st["lower_slack_median"] == pytest.approx(1.0)
    # eta inside the column space: ||P eta|| = ||eta||, upper slack 1 for the equal spectrum
    st = bound_stats(3.0 * q, rng.standard_normal((20, d)) @ q.T)
    assert st["upper_slack_median"] == pytest.approx(1.0) and st["proj_frac_median"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        bound_stats(K, eta[:, :3])
    with pytest.raises(ValueError, match="positive finite"):
        band80(np.array([0.0, 1.0]))


def test_g01_independent_identity_matches_counts_on_an_untrained_mlp():
    import jax

    from gradsparse.models import ResidualMLP
    from theory_checks.g01_identity import independent_identity

    model = ResidualMLP.create(jax.random.key(0), 6, 3, width=8, depth=2, mlp_ratio=2)
    x = np.asarray(jax.random.normal(jax.random.key(1), (10, 6)))
    y = np.arange(10) % 3
    for blk in independent_identity(model, x, y):
        v = blk["valid"]
        assert v.sum() >= 5
        np.testing.assert_allclose(blk["rhs"][v], blk["count"][v], rtol=1e-5)


def test_g04_spearman_and_window_helpers():
    from theory_checks.g04_flatness_together import spearman

    assert spearman(np.arange(5.0), np.arange(5.0) ** 3) == pytest.approx(1.0)
    assert spearman(np.arange(5.0), -np.arange(5.0)) == pytest.approx(-1.0)
    assert math.isnan(spearman(np.arange(2.0), np.arange(2.0)))
    hist = [{"step": s, "k": float(s)} for s in range(0, 101, 10)]
    assert common.window_mean(hist, "k", 0.75, 1.0) == pytest.approx(90.0)  # steps 80, 90, 100
    assert common.end_value(hist, "k") == pytest.approx(95.0)               # steps 90, 100
    assert common.start_end(hist, "k") == (0.0, 100.0)
    with pytest.raises(ValueError, match="not in the training log"):
        common.series(hist, "missing")


def test_g09_relative_isotropy_and_update_null():
    """iid isotropic samples give (alpha/p)(1 + p/N) = 1 within 5% (the iid expectation alpha/p ~ 1/(1+c));
    a covariance dominated by one direction is far below; the iid update null matches itself and not a
    rank-one update."""
    from scipy.stats import ks_2samp

    from theory_checks.g09_isotropy_mp import null_update_eigs, relative_isotropy

    rng = np.random.default_rng(0)
    for p, N in ((64, 640), (128, 4096)):
        X = rng.standard_normal((N, p))
        assert relative_isotropy(X.T @ X / N, N) == pytest.approx(1.0, abs=0.05)
    X[:, 0] *= 30.0
    assert relative_isotropy(X.T @ X / N, N) < 0.1
    w = np.ones(20)
    a = null_update_eigs(64, 16, 20, 8, w, rng)
    b = null_update_eigs(64, 16, 20, 8, w, rng)
    assert a.shape == (16,) and a.mean() == pytest.approx(1.0)
    spike = np.r_[np.full(15, 1e-3), 16.0 - 15e-3]  # a rank-one-like update, mean 1
    assert ks_2samp(a, b).statistic < ks_2samp(a, spike).statistic


# ------------------------------------------------------------------------------------------ runner
def _fake_check(run, name="G99"):
    return Check(name=name, slug=f"g99_fake_{name.lower()}", title="fake", claim="a fake claim", rule="a fake rule",
                 presets={p: {} for p in PRESETS}, run=run)


def test_runner_records_crashes_and_unavailable(tmp_path, monkeypatch):
    from theory_checks.suite import run_checks

    def boom(ctx, p):
        raise RuntimeError("deliberate failure")

    def missing(ctx, p):
        raise Unavailable("module X unavailable")

    def fine(ctx, p):
        return Finding(effect_verdict([0.3, 0.2, 0.4], 0.1), "measured ok", per_seed={"e": [0.3, 0.2, 0.4]})

    checks = [_fake_check(boom, "G97"), _fake_check(missing, "G98"), _fake_check(fine, "G99")]
    results, crashed = run_checks(checks, "smoke", tmp_path, [0, 1, 2], progress=False, echo=False)
    assert crashed
    assert "deliberate failure" in (tmp_path / "g99_fake_g97.error.txt").read_text()
    assert [r.verdict for r in results] == ["INCONCLUSIVE", "INCONCLUSIVE", "PASS"]
    assert results[1].reason == "module X unavailable" and results[1].error is None
    md = (tmp_path / "report.md").read_text()
    assert "**CRASHED**" in md and "g99_fake_g97.error.txt" in md
    data = json.loads((tmp_path / "report.json").read_text())
    assert [r["name"] for r in data["results"]] == ["G97", "G98", "G99"]
    # the CLI exits 1 when a check crashed
    monkeypatch.setattr(suite, "get_checks", lambda names=None: [checks[0]])
    assert cli.main(["check", "--preset", "smoke", "--out", str(tmp_path / "cli"), "--quiet"]) == 1


def test_check_list_and_bad_arguments(capsys):
    assert cli.main(["check", "--list"]) == 0
    out = capsys.readouterr().out
    for i in range(1, 22):
        assert f"G{i} " in out
    assert cli.main(["check", "G42", "--list"]) == 2
    assert cli.main(["check", "G1", "--seeds", "0", "--out", "/tmp/unused-check-dir"]) == 2


def test_context_validates():
    with pytest.raises(ValueError, match="preset"):
        Context(preset="big")
    with pytest.raises(ValueError, match="seeds"):
        Context(seeds=[])
    with pytest.raises(ValueError, match="vmap_seeds.*auto, on, off"):
        Context(vmap_seeds="yes")


# ------------------------------------------------------------------------------------------ smoke suite
@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    rc = cli.main(["check", "--preset", "smoke", "--out", str(out), "--quiet", "--executor", "sequential"])
    return rc, out


def _finite(v):
    return isinstance(v, (int, float)) and math.isfinite(v)


def test_every_check_runs_in_smoke_and_is_well_formed(smoke_report):
    rc, out = smoke_report
    assert rc == 0, (out / "report.md").read_text()
    data = json.loads((out / "report.json").read_text())
    assert data["preset"] == "smoke" and data["seeds"] == [0, 1, 2]
    results = data["results"]
    assert [r["name"] for r in results] == [f"G{i}" for i in range(1, 22)]
    for r in results:
        assert r["error"] is None, r["error"]
        assert r["verdict"] in VERDICTS and r["claim"].strip() and r["rule"].strip() and r["measured"].strip()
        assert 0 <= r["agree"] <= r["n"]
        for part in r["parts"].values():
            assert part["verdict"] in VERDICTS
        if r["reason"].startswith("module") or "unavailable" in r["reason"]:
            continue  # a missing piece is reported, not measured
        assert r["per_seed"], r["name"]
        for k, vals in r["per_seed"].items():
            assert len(vals) == 3 and all(_finite(v) for v in vals), (r["name"], k, vals)
        for k, v in r["numbers"].items():
            assert _finite(v), (r["name"], k, v)
        for f in r["figures"]:
            assert (out / f).is_file()
    md = (out / "report.md").read_text()
    assert "| Claim | Prediction | Measured | Verdict | Figures |" in md
    # the smoke models are small: their seeds train together (auto), and the report says where
    from theory_checks.report import VMAP_NOTE
    assert data["vmap_seeds"] == "auto" and "Seeds trained together with jax.vmap (`--vmap-seeds auto`)" in md
    together = {r["name"] for r in results if any(n.startswith(VMAP_NOTE) for n in r["notes"])}
    assert {"G3", "G5", "G12"} <= together
    for r in results:
        assert f"| {r['name']} " in md and f"### {r['name']}:" in md
    # pre-registered: every check has a plan, trained only its planned arms, and the report names the plan's hash
    plan = json.loads((out / "plan.json").read_text())
    assert set(plan["checks"]) == {r["name"] for r in results}
    for r in results:
        p = plan["checks"][r["name"]]
        assert p.get("parts"), r["name"]
        assert r["unplanned"] == [], (r["name"], r["unplanned"])
        assert set(r["parts"]) == {q["name"] for q in p["parts"]}, r["name"]
        assert r["section"] == p["section"]
    assert f"SHA-256 `{data['plan_sha256']}`" in md
    assert {r["name"] for r in results if r["section"] == "implementation"} == {"G1", "G2"}


def test_smoke_exact_checks_pass(smoke_report):
    """G1 and G2 are identities: they must pass even at smoke scale (their rules are float tolerances)."""
    _, out = smoke_report
    by = {r["name"]: r for r in json.loads((out / "report.json").read_text())["results"]}
    assert by["G1"]["verdict"] == "PASS", by["G1"]["reason"]
    assert max(by["G1"]["per_seed"]["identity_relerr_vmap"]) < 1e-5
    assert by["G2"]["parts"]["no_affine_equals_d"]["verdict"] == "PASS"


def test_figures_command_from_a_report(smoke_report, tmp_path):
    _, out = smoke_report
    assert cli.main(["figures", "--from", str(out), "--out", str(tmp_path), "--no-pdf"]) == 0
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "density_emergence.png" in pngs and "esd_key_mp.png" in pngs
    for p in tmp_path.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["figures", "--from", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2


def test_plot_helpers_validate(tmp_path):
    from gradsparse.figures import plot_bands, plot_bars, plot_curves

    paths = plot_curves({"a": ([0, 1, 2], [1.0, 0.5, 0.2])}, tmp_path / "c", formats=("png",))
    assert paths[0].suffix == ".png" and paths[0].stat().st_size > 0
    assert plot_bands({"a": ([0, 1], [[1, 2], [2, 3]])}, tmp_path / "b", formats=("png",))[0].is_file()
    assert plot_bars({"g1": {"x": [1, 2]}, "g2": {"x": [3]}}, tmp_path / "r", formats=("png",))[0].is_file()
    with pytest.raises(ValueError, match="steps but values"):
        plot_curves({"a": ([0, 1], [1.0])}, tmp_path / "bad")
    with pytest.raises(ValueError, match="labels"):
        plot_bars({"g1": {"x": [1]}, "g2": {"y": [1]}}, tmp_path / "bad")
