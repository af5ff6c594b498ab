"""The FLOP count behind the roofline rows, and the growth benchmark's pieces on one tiny row."""

import math
import sys
from pathlib import Path

import jax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_growth  # noqa: E402
from common import peak_matmul, step_flops  # noqa: E402

from gradsparse.models.mlp import ResidualMLP  # noqa: E402
from gradsparse.models.transformer import ByteLM  # noqa: E402


def test_step_flops_of_the_residual_mlp_closed_form():
    w, depth, b = 24, 3, 5
    m = jax.eval_shape(lambda: ResidualMLP.create(jax.random.key(0), 40, 10, width=w, depth=depth))  # shapes only
    # input 40 -> w, per block K: w -> 4w and V: 4w -> w, head w -> 10; 6 FLOPs per weight per token
    assert step_flops(m, b) == 6 * b * (40 * w + depth * 8 * w * w + 10 * w)


def test_step_flops_of_the_byte_lm_counts_attention():
    w, depth, t, b = 16, 2, 8, 3
    m = jax.eval_shape(lambda: ByteLM.create(jax.random.key(0), seq_len=t, width=w, depth=depth, heads=2))
    dense = depth * (3 * w * w + w * w + 8 * w * w) + 256 * w  # qkv, out, MLP; head (the embedding is a gather)
    assert step_flops(m, b) == 6 * b * t * dense + depth * 12 * b * t * t * w


def test_step_flops_rejects_an_empty_batch():
    m = jax.eval_shape(lambda: ResidualMLP.create(jax.random.key(0), 4, 2, width=4, depth=1))
    with pytest.raises(ValueError, match="batch must be >= 1"):
        step_flops(m, 0)
    with pytest.raises(ValueError, match="matmul size"):
        peak_matmul(0)


def test_overhead_end_is_where_the_ratio_levels_off():
    res = [{"plain_ratio": r, "row": i} for i, r in enumerate((0.1, 0.3, 0.55, 0.62, 0.6))]
    assert bench_growth.overhead_end(res)["row"] == 3  # 0.55 < 0.9 * 0.62 = 0.558 <= 0.62
    res[2]["plain_ratio"] = 0.56
    assert bench_growth.overhead_end(res)["row"] == 2
    assert bench_growth.overhead_end([]) is None


def test_one_tiny_row_is_timed_against_the_matmul():
    row = bench_growth.sweeps(True)[0]
    assert row.sweep == "width" and row.cfg["width"] == 16
    r = bench_growth.time_row(row, repeats=1, mm_n=64)
    assert r["flops"] == 6 * 8 * (40 * 16 + 8 * 16 * 16 + 10 * 16)
    for k in ("plain", "monitored"):
        assert r[f"{k}_ms"] > 0 and math.isclose(r[f"{k}_gflops"], r["flops"] / r[f"{k}_ms"] / 1e6)
        assert math.isclose(r[f"{k}_ratio"], r[f"{k}_gflops"] / r["peak"])
    md = bench_growth.markdown([r])
    assert md.count("\n") == 2 and "| mlp w16 d1 B8 sgd |" in md
