"""Studies: experiments that measure the product, not parts of it.

Does the proxy rank like real training (``fidelity``; the supernet's own check in
``supernet_fidelity``)? Do searched designs beat the references and one network at equal
cost (``compare``, across budgets in ``crossover``)? What should experts share
(``shared_parts_study``)? A user's search never runs these. They may import every room of
``nas`` except ``bench``, and ``meme``.
"""
