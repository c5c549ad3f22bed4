"""The search space: what may be searched, what a candidate costs, and the proxy it trains on.

A space YAML made into a validated ``SearchSpace`` (``space``), candidates drawn from it and
encoded back (``draw``), the per-step budget in GFLOPs or milliseconds (``budget``, with
the space's latency table in ``latency_table``), clustered interval boundaries
(``clusters``), the proxy a trial trains on with its data (``proxy``, ``proxy_data``), and
the exact (cost, loss) front of a chain of per-interval choices (``pareto_chain``). It may
import ``meme`` only: this is the bottom room of ``nas``.
"""
