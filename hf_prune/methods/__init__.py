"""The pruning methods, one package each (``config.py``, ``oneshot.py``, ``callback.py`` and the method's
own modules); every package registers itself with :mod:`hf_prune.registry` when imported, and the
registry imports them all on first lookup.

* :mod:`.depgraph` — DepGraph structural pruning (channels, heads) with sparse learning.
* :mod:`.updp` — UPDP depth pruning with exact block merging, supernet and search.
* :mod:`.stagewise` — SP stage-wise width supernet and search.
* :mod:`.rd` — RD layer-adaptive weight pruning by rate-distortion.
* :mod:`.ovit` — oViT / CAP second-order weight pruning (unstructured, N:M).
* :mod:`.magnitude` — magnitude weight pruning (global, uniform, LAMP, ERK).
"""
