"""Model loading: find a model on disk (a local HF directory, a GGUF file, the embedded
default) and load it offline, with optional weight-only quantization.

Imports only the top-level vocabulary (``config``, ``errors``, ...); everything above it
(safety, backends, runtime) reads a :class:`~acd_engine.loading.models.LoadedModel`.
"""
