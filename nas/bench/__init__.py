"""Benchmarks: ``python -m nas.bench`` prints every speed claim as a ratio against a baseline
measured in the same run.

``run`` is the command (it gathers ``meme.speed``'s model rows); ``search_costs`` times the
search itself (drawing, pricing, recording, a proxy trial, supernet scoring). It may
import every room of ``nas`` except ``studies``, and ``meme``.
"""
