"""What the model costs in seconds: benchmarks, latency and its per-block model.

Timing primitives shared by every benchmark (``timing``, ``bench_report``), measured step
latency (``latency``) and the per-block table that prices a candidate without timing it
(``latency_model``), and the model benchmarks behind ``nas.bench``: sampling and
training (``model_bench``), one forward per numeric path (``forward_bench``), and
multi-process scaling (``scaling``). It is the top room of ``meme`` and may import all
the others.
"""
