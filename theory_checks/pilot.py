"""Pilot runs of a check on seeds outside every preset's test seeds (default 1000, 1001).

Deltas and thresholds of the checks come from pilots, never from the seeds a verdict is decided
on (presets use seeds 0..N-1 with N <= 1000 by default). ``python -m theory_checks.pilot G6
--preset quick`` runs the check's own ``run`` (same arms, same measurements) on the pilot seeds
and prints each part's per-seed values and their mean: the numbers a check's delta source cites.
Nothing is judged (two seeds decide nothing) and no report is written. Without ``--out`` the
pilot's run folders (which some checks read back, e.g. G21's checkpoints) go to a temporary
directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gradsparse.runtime import enable_compilation_cache
from theory_checks.context import Context
from theory_checks.protocol import PRESETS
from theory_checks.suite import get_checks

#: the default pilot seeds: outside the test seeds 0..N-1 of every preset
PILOT_SEEDS = (1000, 1001)


def pilot(name: str, preset: str = "quick", seeds: Sequence[int] = PILOT_SEEDS,
          out: Path | None = None) -> dict[str, Any]:
    """{part: {"values": per pilot seed, "mean": mean}} of check ``name`` run on ``seeds``, plus
    the check's per-seed numbers under "per_seed". The run folders go to ``out`` or, when it is
    None, to a temporary directory removed before returning."""
    if any(s < 1000 for s in seeds):
        raise ValueError(f"pilot seeds must be >= 1000 (outside every preset's test seeds), got {list(seeds)}")
    (check,) = get_checks([name])
    enable_compilation_cache()
    if out is None:
        with tempfile.TemporaryDirectory(prefix="gradsparse-pilot-") as tmp:
            return pilot(name, preset, seeds, Path(tmp))
    ctx = Context(preset=preset, seeds=list(seeds), out_dir=out)
    finding = check.run(ctx, check.params(preset))
    parts = {k: {"values": v.values, "mean": float(np.mean(v.values)) if v.values else None, "kind": v.kind}
             for k, v in finding.parts.items()}
    return {"check": check.name, "preset": preset, "seeds": list(seeds), "parts": parts,
            "per_seed": finding.per_seed, "measured": finding.measured}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m theory_checks.pilot", description=__doc__.splitlines()[0])
    ap.add_argument("name", help="a check (G1 ... G21)")
    ap.add_argument("--preset", choices=PRESETS, default="quick")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(PILOT_SEEDS))
    ap.add_argument("--out", type=Path, default=None, help="keep the pilot's run folders here")
    args = ap.parse_args(argv)
    try:
        res = pilot(args.name, args.preset, args.seeds, args.out)
    except ValueError as e:
        print(f"pilot: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
