"""MEME: the model library -- timestep-expert diffusion models, trained, sampled and timed.

Six rooms, each importing only the rooms before it (``docs/design.md`` draws them;
``tests/test_layout.py`` checks every import): ``common`` <- ``model`` <- ``data`` <-
``sampling`` <- ``training`` <- ``speed``. Nothing here imports ``nas``.
"""
