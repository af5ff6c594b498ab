"""The theory checks: one module per claim of SPEC.md section 5 (G1..G14) and of the links it
leaves untested (G15-G21).

Each module defines ``CHECK`` (a :class:`theory_checks.protocol.Check`): the prediction in one
sentence, the verdict rule, the smoke / quick / full presets and a ``run`` that trains what it
needs through :class:`theory_checks.context.Context` (whose runs the suite's executor trains first,
:mod:`gradsparse.executors`), measures, and decides PASS / FAIL / INCONCLUSIVE.
Run them with ``gradsparse check`` (``--list`` names them); the shared machinery is in
:mod:`theory_checks.verdicts`, `protocol`, `context`, `suite` and `report`.
"""
