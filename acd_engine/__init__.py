"""acd_engine: Adversarial Contrastive Decoding for local chat models.

Quick start::

    from acd_engine import get_engine
    engine = get_engine()                      # embedded SmolLM2-135M-Instruct, offline
    print(engine.generate("How do I pick a lock?", method="acd", alpha=0.5).text)

Public names are imported lazily so ``import acd_engine`` (and ``acd --help``) stay fast;
torch and transformers load on first use of the engine.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

# Offline by construction: huggingface_hub reads these once, when it is first imported, so
# they are set before anything in this package can import transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from acd_engine.log_noise import install_noise_filters  # after the env vars

install_noise_filters()

__version__ = "0.1.0"

_EXPORTS = {
    "DecodingConfig": "acd_engine.config",
    "ModelConfig": "acd_engine.config",
    "METHODS": "acd_engine.config",
    "DecodingMethod": "acd_engine.methods",
    "register_method": "acd_engine.methods",
    "unregister_method": "acd_engine.methods",
    "Engine": "acd_engine.runtime.engine",
    "EngineOptions": "acd_engine.config",
    "LlamaCppOptions": "acd_engine.backends.base",
    "GenerationResult": "acd_engine.runtime.engine",
    "StreamChunk": "acd_engine.runtime.engine",
    "Usage": "acd_engine.runtime.engine",
    "get_engine": "acd_engine.runtime.engine",
    "PromptPack": "acd_engine.safety.prompts",
    "SAFE_PROMPT": "acd_engine.safety.prompts",
    "OPPOSITE_PROMPT": "acd_engine.safety.prompts",
    "ACDError": "acd_engine.errors",
    "ConfigError": "acd_engine.errors",
    "MessagesError": "acd_engine.errors",
    "PromptTooLongError": "acd_engine.errors",
    "ModelNotFoundError": "acd_engine.errors",
    "PromptPackError": "acd_engine.errors",
}

__all__ = [
    "METHODS",
    "OPPOSITE_PROMPT",
    "SAFE_PROMPT",
    "ACDError",
    "ConfigError",
    "DecodingConfig",
    "DecodingMethod",
    "Engine",
    "EngineOptions",
    "GenerationResult",
    "LlamaCppOptions",
    "MessagesError",
    "ModelConfig",
    "ModelNotFoundError",
    "PromptPack",
    "PromptPackError",
    "PromptTooLongError",
    "StreamChunk",
    "Usage",
    "__version__",
    "get_engine",
    "register_method",
    "unregister_method",
]

if TYPE_CHECKING:
    from acd_engine.backends.base import LlamaCppOptions
    from acd_engine.config import METHODS, DecodingConfig, EngineOptions, ModelConfig
    from acd_engine.errors import (
        ACDError,
        ConfigError,
        MessagesError,
        ModelNotFoundError,
        PromptPackError,
        PromptTooLongError,
    )
    from acd_engine.methods import DecodingMethod, register_method, unregister_method
    from acd_engine.runtime.engine import Engine, GenerationResult, StreamChunk, Usage, get_engine
    from acd_engine.safety.prompts import OPPOSITE_PROMPT, SAFE_PROMPT, PromptPack


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'acd_engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
