"""Where a trial's score comes from: the evaluators that judge one candidate.

``trial`` is the trial body every engine calls (from-scratch training on the proxy, or
scoring by the supernet); ``supernet_training`` trains the weight-shared supernets and
``supernet_score`` scores a candidate's experts as their sub-networks; ``reference``
scores the hand-designed baseline. Change a score here without touching an engine. It
may import ``nas.space`` and ``meme``; it knows nothing of Optuna or Ray.
"""
