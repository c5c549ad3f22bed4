"""Training: one run of a MEME on one process or many, and the compute it is charged.

``train`` (the Trainer and the ``meme-nas train`` command) with its flags (``options``),
data- and expert-parallel ranks (``distributed``), training compute counted from the
schedule (``compute``), experts branched from shared weights (``branching``), and the
small first-stage autoencoder (``first_stage``, with its command ``first_stage_cli``).
It may import every room before it: ``common``, ``model``, ``data`` and ``sampling``.
"""
