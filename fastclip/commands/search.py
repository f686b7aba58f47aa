"""``fastclip search <index> "text" --top 10``: defined beside the index format, in :mod:`fastclip.commands.index`."""
from fastclip.commands.index import search_main as main

__all__ = ["main"]
