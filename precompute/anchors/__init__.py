"""Anchor models of the precompute phase; importing this package registers every loader."""
from . import clip, depth, dino, pidinet, sam  # noqa: F401
