"""The engine: how trials are drawn, run, recorded and resumed, under Optuna or Ray Tune.

What a run was asked for (``settings``), the study and its storage (``study``), how a
trial is drawn, judged and recorded under both engines (``record``), stale-trial sweeps
(``heartbeat``), the two engines (``optuna_engine``, ``ray_engine``), runs of many seeds
side by side (``replicates``) and their re-ranking with statistics (``rerank``,
``stats``), the exact interval-wise optimiser over a supernet (``interval_opt``), the
study outputs (``report``) and the dashboard (``dashboard``). It may import
``nas.space``, ``nas.evaluators`` and ``meme``.
"""
