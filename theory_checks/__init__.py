"""The theory checks: one module per claim G1..G14 of SPEC.md section 5.

Each module defines ``CHECK`` (a :class:`theory_checks.protocol.Check`): the prediction in one
sentence, the verdict rule, the smoke / quick / full presets and a ``run`` that trains what it
needs through :func:`gradsparse.train.train`, measures, and decides PASS / FAIL / INCONCLUSIVE.
Run them with ``gradsparse check`` (``--list`` names them); the shared machinery is in
:mod:`theory_checks.verdicts`, `protocol`, `context`, `suite` and `report`.
"""
