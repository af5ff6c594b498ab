"""Cost of the in-step monitors: the jitted training step with all monitors vs without.

Model: the residual LN-MLP on mnist1d (gradsparse.factory.build), SGD. Both steps come from
``train.make_train_step(..., monitors=True|False)`` and run on the same model, optimizer state
and batch, interleaved; each advances its own copy of the training state, as in ``train``.

Printed ratios (medians, warm-up excluded):
- ``monitor_overhead_w{W}_d{D}_b{B}`` = t(step with monitors) / t(step without); target < 1.10.
- ``monitor_overhead_amortised_...`` = the cost of training with ``log_every = 50`` (one
  monitored step in 50, what ``train`` does by default) relative to never monitoring.
"""

from __future__ import annotations

import common  # noqa: F401  (puts the checkout on sys.path)

from common import header, mnist1d_batch, monitor_step_times, quick, report

LOG_EVERY = 50


def bench(width: int, depth: int, batch: int, ds, repeats: int) -> None:
    t, _ = monitor_step_times(width, depth, batch, ds, repeats=repeats, warmup=3, number=5)
    on, off = t["on"]["median"], t["off"]["median"]
    tag = f"w{width}_d{depth}_b{batch}"
    print(f"  width {width} depth {depth} batch {batch}: step with monitors {on * 1e3:.3f} ms, "
          f"without {off * 1e3:.3f} ms (median of {t['on']['repeats']})")
    report(f"monitor_overhead_{tag}", on / off, target="< 1.10",
           note=f"{on * 1e3:.2f} ms vs {off * 1e3:.2f} ms per step")
    amort = ((LOG_EVERY - 1) * off + on) / (LOG_EVERY * off)
    report(f"monitor_overhead_amortised_{tag}", amort, target="< 1.10",
           note=f"one monitored step in {LOG_EVERY} (train's default log_every)")


def main() -> None:
    header("bench_monitors: training step with vs without the in-step monitors")
    x, y, ds = mnist1d_batch(256)
    repeats = 7 if quick() else 25
    for width, depth, batch in [(128, 4, 64), (512, 4, 64)]:
        bench(width, depth, batch, ds, repeats)


if __name__ == "__main__":
    main()
