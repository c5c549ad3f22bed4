"""Search spaces shipped with MEME-NAS (installed as the package data ``nas.spaces``)."""
