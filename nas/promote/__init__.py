"""After the search: a study's winners exported as YAML and trained at full scale.

``export`` writes a trial's architecture as a config; ``promote`` trains, samples and
evaluates the top K on the target data (locally or as Ray tasks); ``ray_train`` runs one
training across Ray Train workers. It may import ``engine``, ``evaluators``, ``space``
and ``meme``.
"""
