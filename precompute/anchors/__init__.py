"""Anchor models of the precompute phase; importing this registers every loader."""
import importlib

for _module in ("sam", "depth", "dino", "pidinet", "clip"):
    try:
        importlib.import_module(f"{__name__}.{_module}")
    except ModuleNotFoundError as e:  # a module not written yet must not hide the others
        if e.name != f"{__name__}.{_module}":
            raise
