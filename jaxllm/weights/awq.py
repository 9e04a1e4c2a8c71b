"""Hugging Face AWQ checkpoints (AutoAWQ's 4-bit "gemm" format), read into the int4 layout as they are stored.

config.json carries `quantization_config: {"quant_method": "awq", "bits": 4, "group_size": G,
"version": "gemm", "zero_point": true}`, and each linear layer `X` three tensors, already `[in, out]`:

    X.qweight  int32 [in, out // 8]       eight int4 values of eight consecutive output columns per int32
    X.qzeros   int32 [in // G, out // 8]  packed the same way
    X.scales   fp16  [in // G, out]

with w[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]. Within an int32, bits 4i..4i+3 hold column AWQ_ORDER[i]
of its eight. In our layout that is scale = s and zero = -z * s (exact in float32).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from jaxllm.config import ConfigError, ModelLoadError
from jaxllm.weights.mapping import QuantizedWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SHIFTS = (4 * np.argsort(AWQ_ORDER)).astype(np.uint32)  # [8]: where column j of eight sits in its int32
_PARTS = ("qweight", "qzeros", "scales")


def awq_group_size(hf_config: Any) -> int | None:
    """The group size of an AWQ checkpoint (None when config.json has no quantization_config). Other
    quantization methods and AWQ variants we cannot read are a ConfigError."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method != "awq":
        raise ConfigError(f"the checkpoint is quantized with quant_method={method!r}, which jaxllm cannot read; "
                          "supported: awq (4-bit, version 'gemm', with zero points), or a float checkpoint")
    # AutoAWQ's defaults for absent keys, as transformers' AwqConfig has them.
    bits, group = qc.get("bits", 4), qc.get("group_size", 128)
    version, zero_point = str(qc.get("version", "gemm")).lower(), qc.get("zero_point", True)
    if bits != 4 or version != "gemm" or not zero_point or not isinstance(group, int) or group <= 0:
        raise ConfigError(f"AWQ checkpoint with bits={bits}, version={version!r}, zero_point={zero_point}, "
                          f"group_size={group}: jaxllm reads bits=4, version 'gemm', zero_point true and a positive "
                          "group_size")
    return group


def unpack_awq(packed: np.ndarray) -> np.ndarray:
    """int32 [rows, cols // 8] in AWQ's packing -> uint8 [rows, cols], the values 0..15 in column order."""
    values = (packed.view(np.uint32)[:, :, None] >> _SHIFTS) & 15  # [rows, cols // 8, 8]
    return values.astype(np.uint8).reshape(packed.shape[0], -1)


def awq_tensors(tensors: Iterable[tuple[str, np.ndarray]], source: str
                ) -> Iterator[tuple[str, np.ndarray | QuantizedWeight]]:
    """Pass the float tensors through; gather each layer's qweight, qzeros and scales (in whatever order and
    shard they come) into one `X.weight` QuantizedWeight [out, in]."""
    pending: dict[str, dict[str, np.ndarray]] = {}
    for name, tensor in tensors:
        layer, _, part = name.rpartition(".")
        if part not in _PARTS:
            yield name, tensor
            continue
        parts = pending.setdefault(layer, {})
        parts[part] = tensor
        if len(parts) == len(_PARTS):
            del pending[layer]
            yield f"{layer}.weight", _quantized_weight(parts, layer, source)
    if pending:
        layer, parts = next(iter(pending.items()))
        raise ModelLoadError(f"{source}: AWQ layer {layer!r} has only {', '.join(parts)} of "
                             f"{', '.join(_PARTS)} ({len(pending)} incomplete layer(s))")


def _quantized_weight(parts: dict[str, np.ndarray], layer: str, source: str) -> QuantizedWeight:
    q = unpack_awq(parts["qweight"])  # [in, out]
    z = unpack_awq(parts["qzeros"]).astype(np.float32)  # [in // G, out]
    s = parts["scales"].astype(np.float32)  # [in // G, out]
    if z.shape != s.shape or q.shape[1] != s.shape[1]:
        raise ModelLoadError(f"{source}: AWQ layer {layer!r} has qweight {parts['qweight'].shape}, qzeros "
                             f"{parts['qzeros'].shape} and scales {parts['scales'].shape}, which disagree")
    return QuantizedWeight(q.T, s.T, (-z * s).T)
