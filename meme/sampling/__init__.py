"""Sampling a trained run and measuring what it learnt.

``sample`` (DDIM/DDPM over experts, the ``meme-nas sample`` command), ``evaluate`` (FID,
precision/recall, offline Inception weights located by ``fid_assets``), and the analyses
of a trained network: held-out loss per interval (``heldout``), feature-map spectra
(``frequency``) and timestep clustering by gradient similarity (``timestep_clusters``).
It may import ``common``, ``model`` and ``data``; training imports it (for preview
grids), never the other way round.
"""
