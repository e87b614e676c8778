"""The llama.cpp backend: an engine's calls on llama.cpp's batch API over the model's GGUF
(``backend``), and the safety gate read from llama.cpp's own layers (``gate``).

Needs the ``[llamacpp]`` extra; nothing here is imported unless an engine picks it.
"""
