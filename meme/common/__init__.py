"""What every command and layer shares, with no knowledge of networks.

Errors told in one line (``errors``), the edge of a command (``command``: ``main_guard``,
logging), the device (``device``) and its numeric fast paths (``fastpath``: bf16 autocast,
channels_last), safe and atomic files (``checkpoint``), image conversion (``images``) and
markdown tables (``markdown``). It may import only the standard library and third-party
packages: every other room imports it, so it imports none of them.
"""
