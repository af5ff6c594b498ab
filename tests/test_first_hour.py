"""A first run as a new user meets it: the first line comes at once and says what runs and what it
costs; each check's line and the report say how much of the time was compiling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradsparse import cli
from gradsparse.commands import check as check_cmd
from theory_checks.protocol import PRESETS, Check, Finding
from theory_checks.suite import CompileClock, run_checks, time_split
from theory_checks.verdicts import effect_verdict

from test_figures import _first_stderr_line


def test_check_prints_its_first_line_before_loading_the_checks(tmp_path):
    """Piped output used to stay silent until the first check finished (134 s on a first run)."""
    line, imported = _first_stderr_line(["check", "G3", "G13", "--preset", "quick", "--out", str(tmp_path / "r")],
                                        tmp_path, "gradsparse check:")
    for bit in ("G3, G13", "preset quick", "seeds 0-2", str(tmp_path / "r"), "expected about", "min"):
        assert bit in line, (bit, line)
    assert not any(m.startswith(("theory_checks", "equinox", "optax")) for m in imported)
    assert "jax" not in imported  # the compilation cache is set through JAX's environment, not by importing it
    assert not (tmp_path / "r" / "plan.json").exists()  # nothing was started yet


def test_the_compilation_cache_settings_reach_jax_imported_later(tmp_path):
    code = ("import sys; from gradsparse.runtime import enable_compilation_cache; "
            "f = enable_compilation_cache(); assert 'jax' not in sys.modules; import jax; "
            "print(jax.config.jax_compilation_cache_dir == str(f), jax.config.jax_persistent_cache_min_compile_time_secs,"
            " jax.config.jax_persistent_cache_min_entry_size_bytes)")
    env = {**os.environ, "GRADSPARSE_CACHE": str(tmp_path / "c")}
    for k in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"):
        env.pop(k, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "0.0", "0"]


def test_expected_time_adds_the_measured_check_times(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADSPARSE_CACHE", str(tmp_path / "cache"))
    assert check_cmd.cache_is_cold()
    warm = (check_cmd.QUICK_SECONDS["G3"] + check_cmd.QUICK_SECONDS["G13"]) / 60
    assert check_cmd.expected_time(["g03", "13"], "quick", cold=False) == f"about {max(warm, 1):.0f} min on 2 idle " \
                                                                          "CPU cores (compilation cache warm)"
    cold = check_cmd.expected_time([], "quick", cold=True)
    total = sum(check_cmd.QUICK_SECONDS.values()) / 60
    assert f"about {total * check_cmd.COLD_FACTOR:.0f} min" in cold and "first run" in cold
    assert f"later runs about {total:.0f} min" in cold
    (tmp_path / "cache" / "jax").mkdir(parents=True)
    (tmp_path / "cache" / "jax" / "entry").write_bytes(b"x")
    assert not check_cmd.cache_is_cold()
    assert [check_cmd.check_number(n) for n in ("G14", "g03", "7", "g10_modules_from_scratch", "G21", "G22", "x")] \
        == [14, 3, 7, 10, 21, None, None]
    assert "unknown" in check_cmd.expected_time(["G22"], "quick", cold=False)
    local = total / check_cmd.LOCAL_SPEEDUP
    assert check_cmd.expected_time([], "quick", cold=False, executor="local") == \
        f"about {local:.0f} min on 2 idle CPU cores (compilation cache warm)"


def test_compile_clock_counts_the_union_of_compile_spans():
    clock = CompileClock()
    clock.spans = [(0.0, 2.0), (1.0, 3.0), (2.5, 2.7), (5.0, 6.0)]  # nested and overlapping spans count once
    assert clock.seconds() == pytest.approx(4.0)
    assert clock.seconds(2.0) == pytest.approx(2.0)
    assert clock.seconds(0.5, 1.5) == pytest.approx(1.0)
    assert time_split(10.0, 4.0, 3, 2) == "compiling 4.0 s (3 compiled, 2 from the cache), running 6.0 s"


def test_compile_clock_measures_jax_compilation():
    import jax
    import jax.numpy as jnp

    @jax.jit
    def f(x):
        for _ in range(20):
            x = jnp.tanh(x @ x + 0.123456)  # a constant of its own: not in the persistent cache of other tests
        return x

    x = jnp.ones((16, 16))
    with CompileClock() as clock:
        t0 = time.time()
        f(x).block_until_ready()
        first = clock.since((t0, 0, 0))
        t1 = time.time()
        m = clock.mark()
        f(x).block_until_ready()
        again = clock.since(m)
        t2 = time.time()
    assert 0 < first[0] <= t1 - t0 and first[1] + first[2] >= 1  # compiled or read from the cache
    assert again == (0.0, 0, 0) and t2 - t1 < t1 - t0
    from jax._src import monitoring

    assert clock._span not in monitoring.get_event_time_span_listeners()  # the clock let go when closed


def _jit_check(name="G98"):
    def run(ctx, p):
        import jax
        import jax.numpy as jnp

        def f(x):
            for i in range(30):  # enough to trace and lower for well over the 0.01 s that the report rounds to
                x = jnp.sin(x) * 2.5 + 0.987 + i
            return x

        jax.jit(f)(jnp.arange(7.0)).block_until_ready()
        return Finding(effect_verdict([0.3, 0.2, 0.4], 0.1), "measured ok", per_seed={"e": [0.3, 0.2, 0.4]})

    return Check(name=name, slug=f"g98_fake_{name.lower()}", title="fake", claim="a fake claim", rule="a fake rule",
                 presets={p: {} for p in PRESETS}, run=run)


def test_each_check_says_how_long_it_compiled(tmp_path, capsys):
    results, crashed = run_checks([_jit_check()], "smoke", tmp_path, [0, 1, 2], progress=False, echo=True)
    assert not crashed
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("G98")]
    assert "s (compiling " in line and ", running " in line
    data = json.loads((tmp_path / "report.json").read_text())
    comp = data["compile_s_of"]["G98"]
    assert 0 < comp <= results[0].elapsed_s + 0.05 and data["compile_s"] >= comp
    md = (tmp_path / "report.md").read_text()
    assert f"wall time {data['wall_s']:.0f} s (compiling {data['compile_s']:.0f} s, running" in md
    assert f"(compiling {comp:.1f} s)" in md


def test_check_command_ends_with_the_compile_split(tmp_path, monkeypatch, capsys):
    from theory_checks import suite

    monkeypatch.setattr(suite, "get_checks", lambda names=None: [_jit_check("G97")])
    assert cli.main(["check", "G97", "--preset", "smoke", "--out", str(tmp_path / "r")]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines()[0].startswith("gradsparse check: G97, preset smoke, seeds 0-2")
    last = out.strip().splitlines()[-1]
    assert last.startswith("1 check(s) in ") and "(compiling " in last and ", running " in last
