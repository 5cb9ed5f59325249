"""The analysis: source + adapter + geometry -> one :class:`~hf_flag.report.Report` (the only place they meet).

``api`` (:func:`analyze`, the public entry point, re-exported as ``hf_flag.analyze``), ``transformer`` (blocks read
through an adapter), ``chain`` (plain ``nn.Linear`` chains), ``pairs`` (pair rows), ``heads`` (head-overlap and
composition rows), ``checks`` (input checks).  Row names live in :mod:`hf_flag.rows`.
"""
