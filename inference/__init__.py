"""Using a trained model: answer questions (``generate``), score benchmarks (``evaluate``), draw the visual
thoughts beside the anchors' outputs (``thoughts``). The only package that imports both phases (``thoughts``
runs precompute's anchor models); ``python -m trainer generate|evaluate`` reaches it through the CLI."""
