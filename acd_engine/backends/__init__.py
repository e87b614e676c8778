"""Backends: what runs a model's forwards under the engine's one request path.

``base`` holds the :class:`~acd_engine.backends.base.Backend` protocol and which backend an
engine runs; ``step`` the token step every backend applies; ``torch/`` the PyTorch backend
(its fast path and reference path and their kernels); ``llamacpp/`` the llama.cpp backend.

Imports the top level, ``loading`` and ``safety``; the runtime imports it.
"""
