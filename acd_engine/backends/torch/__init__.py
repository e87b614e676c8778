"""The torch backend: the fast path (rows planned into one batch over cached branch
prefixes, the gate read in the prefill) and the reference path (the tests' oracle), with
the CPU kernels the fast path picks between.

``backend`` is the entry point; ``rows`` turns rendered requests into model rows,
``prefix_cache`` and ``row_layout`` hold and lay out their KV, ``kernels`` chooses how
forwards run (``skinny``, ``prepack``, ``head``), and ``decoding`` is the decode loops.
"""
