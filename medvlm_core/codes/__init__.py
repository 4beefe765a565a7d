"""Coded answers, offline: ICD-10-CM codes for diagnoses, generic names and ids for drugs (docs/codes.md).

``icd10cm`` (the code set, checking codes, the search), ``text`` and ``abbreviations`` (how clinicians write),
``drugs`` (the drug dictionary), ``doses`` (doses, frequencies, routes, durations), ``linking`` (the stage that
codes a chunk's ``diagnoses`` and ``medications`` rows) and ``relink`` (``medvlm codes link``). The code sets load
on first use, once per process; importing this package loads nothing.
"""
