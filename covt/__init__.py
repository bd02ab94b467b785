"""What both phases share besides the cache: the config schema (``config``), the anchors' vocabulary
(``anchors``), the square view of an image (``images``), device and process-group set-up (``compute``)
and atomic files (``fs``). It imports none of ``shards``, ``precompute``, ``trainer`` or ``inference``."""
