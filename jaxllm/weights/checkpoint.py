"""jaxllm's own checkpoint: Orbax-saved parameters in our layout and dtype, with config and tokenizer.

It skips name mapping, transposes and dequantization, and restores straight onto the mesh's shardings,
so it loads faster than the source it was converted from (`jaxllm convert`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxllm.config import ModelLoadError
from jaxllm.weights.hub import CHECKPOINT_MARKER

FORMAT_VERSION = 1


def save_checkpoint(dst: Path, params: Any, hf_config: Any, tokenizer: Any, *, dtype: Any,
                    eos_token_ids: tuple[int, ...], rope_freq_factors: tuple[float, ...] | None) -> None:
    """Write params (Orbax), config.json, tokenizer files, generation_config.json and the marker file."""
    dst = Path(dst).absolute()
    if dst.exists() and any(dst.iterdir()):
        raise ModelLoadError(f"{dst} exists and is not empty; choose a new directory")
    dst.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(dst / "params", params)
    hf_config.dtype = jax.numpy.dtype(dtype).name
    hf_config.to_json_file(str(dst / "config.json"))
    tokenizer.save_pretrained(str(dst))
    (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": list(eos_token_ids)}, indent=2))
    (dst / CHECKPOINT_MARKER).write_text(json.dumps(
        {"format_version": FORMAT_VERSION, "dtype": jax.numpy.dtype(dtype).name,
         "rope_freq_factors": rope_freq_factors}, indent=2))


def read_marker(src: Path) -> dict:
    try:
        info = json.loads((src / CHECKPOINT_MARKER).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{src / CHECKPOINT_MARKER} is unreadable ({e})") from e
    if info.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(f"{src} is a jaxllm checkpoint of format {info.get('format_version')}, this jaxllm "
                             f"reads format {FORMAT_VERSION}; convert the source again")
    return info


def restore_params(src: Path, abstract: Any, shardings: Any) -> Any:
    """Restore onto `shardings`, casting to the dtypes of `abstract` (a tree of ShapeDtypeStruct)."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(Path(src).absolute() / "params", target)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise ModelLoadError(f"{src}: the Orbax parameters do not match this config ({e})") from e
