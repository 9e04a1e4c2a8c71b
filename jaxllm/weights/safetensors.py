"""Hugging Face model directories: config.json, one or sharded *.safetensors, tokenizer files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from safetensors import SafetensorError, safe_open

from jaxllm.config import ModelLoadError


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files: those named by model.safetensors.index.json, else every *.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index} is not a valid safetensors index ({e})") from e
        files = [model_dir / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index.name} names shard(s) missing from {model_dir}: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir} has no *.safetensors weights (PyTorch .bin files are not supported: "
                             "convert them with transformers' save_pretrained(safe_serialization=True))")
    return files


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) one tensor at a time, as numpy on the host (bf16 via ml_dtypes)."""
    cpu = jax.devices("cpu")[0]
    for path in safetensors_files(model_dir):
        try:
            # framework="flax" reads bf16, which the numpy framework cannot; the array stays on the host.
            with jax.default_device(cpu), safe_open(str(path), framework="flax") as f:
                for name in f.keys():
                    yield name, np.asarray(f.get_tensor(name))
        except SafetensorError as e:
            raise ModelLoadError(f"{path} is not a readable safetensors file ({e})") from e
