"""Helpers of :mod:`hf_flag.analyze`, split by row family: pair rows, head rows, checks and summary."""
