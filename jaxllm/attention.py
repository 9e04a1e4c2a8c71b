"""The attention interface between the model and the kernels: metadata, KV pages, backend choice.

One step's batch is ragged (vLLM's vocabulary): `num_tokens` query tokens from `num_seqs` sequences,
each sequence reading and writing the pages of its block table. The model calls `paged_attention`; which
implementation runs, and so which KV page layout is allocated, is decided here once per engine
(`resolve_backend`), never per step:

    backend               runs                                            KV pages (per layer, K and V)
    reference             jnp gather + softmax (.../reference.py)         [num_pages, page_size, kv_heads, head_dim]
    xla                   jnp ragged tiles, dynamic KV loop (xla.py);     as reference
                          decode steps on a CPU: C++ (cpu.py)
    pallas-gpu            the Pallas GPU kernel (Triton lowering, gpu.py) [kv_heads, num_pages, page_size, head_dim]
    pallas-tpu            the Pallas TPU kernel (Mosaic, tpu.py)          as pallas-gpu
    pallas-interpret      the GPU kernel in Pallas interpret mode (CPU)   as pallas-gpu
    pallas-tpu-interpret  the TPU kernel in the TPU interpreter (CPU)     as pallas-gpu
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pallas_kernels.paged_attention import cpu, gpu, reference, tpu, xla
from pallas_kernels.paged_attention.reference import quantize_kv

BACKENDS = ("reference", "xla", "pallas-gpu", "pallas-tpu", "pallas-interpret", "pallas-tpu-interpret")
_PLATFORM_KERNEL = {"gpu": "pallas-gpu", "tpu": "pallas-tpu", "cpu": "pallas-interpret"}


@struct.dataclass
class AttentionMetadata:
    """Where this step's tokens sit in the paged KV cache.

    slot_mapping:    [num_tokens] page * page_size + offset to write each new K/V; padding: the spare page
                     past the pool (num_pages * page_size: allocate_kv_pages).
    block_tables:    [num_seqs, pages_per_seq] page indices of each sequence, in order.
    seq_lens:        [num_seqs] tokens in each sequence after this step (0 for a padding sequence).
    query_start_loc: [num_seqs + 1] sequence s owns query tokens query_start_loc[s]:query_start_loc[s+1].
    max_query_len:   static bound on any sequence's query tokens in this step (1 for pure decode).
    """

    slot_mapping: jax.Array
    block_tables: jax.Array
    seq_lens: jax.Array
    query_start_loc: jax.Array
    max_query_len: int = struct.field(pytree_node=False)


class KVPages(NamedTuple):
    """One layer's KV cache, k and v in the backend's layout (see the module docstring). With
    kv_cache_dtype="int8" the pages hold int8 and k_scale, v_scale one float32 scale per token and KV head:
    [num_pages, page_size, kv_heads] (jnp versions) or [kv_heads, num_pages, page_size] (kernels)."""

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None


def resolve_backend(requested: str, platform: str) -> str:
    """"auto": the Pallas kernel on GPU and TPU, the jnp ragged version ("xla") elsewhere; "pallas": the
    platform's kernel, in interpret mode on CPU; "reference": the jnp oracle (cost grows with the static
    shapes: for tests and tiny models). Internal names (BACKENDS) pass through."""
    if requested == "auto":
        return _PLATFORM_KERNEL[platform] if platform in ("gpu", "tpu") else "xla"
    if requested == "pallas":
        if platform not in _PLATFORM_KERNEL:
            raise ValueError(f"attention_backend='pallas' has no kernel for platform {platform!r}; use 'reference'")
        return _PLATFORM_KERNEL[platform]
    if requested in BACKENDS:
        return requested
    raise ValueError(f"attention_backend must be auto, pallas or reference, got {requested!r}")


def kv_pages_shape(backend: str, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int) -> tuple:
    if backend in ("reference", "xla"):
        return (num_pages, page_size, num_kv_heads, head_dim)
    return (num_kv_heads, num_pages, page_size, head_dim)


def kv_pages_spec(backend: str) -> PartitionSpec:
    """KV heads split across the mesh's model axis, wherever the layout puts them."""
    return PartitionSpec(None, None, "model", None) if backend in ("reference", "xla") else PartitionSpec("model")


def kv_scales_shape(backend: str, num_pages: int, page_size: int, num_kv_heads: int) -> tuple:
    """int8 KV: one scale per token and KV head, laid out like the pages without head_dim."""
    return kv_pages_shape(backend, num_pages, page_size, num_kv_heads, 1)[:-1]


def kv_scales_spec(backend: str) -> PartitionSpec:
    return PartitionSpec(None, None, "model") if backend in ("reference", "xla") else PartitionSpec("model")


def kv_specs(backend: str, quantized: bool) -> KVPages:
    """One layer's PartitionSpecs, as a KVPages."""
    pages = kv_pages_spec(backend)
    scales = kv_scales_spec(backend) if quantized else None
    return KVPages(pages, pages, scales, scales)


KV_CACHE_DTYPES = ("auto", "int8")  # auto: the model's dtype


def allocate_kv_pages(backend: str, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
                      head_dim: int, dtype, mesh: Mesh | None = None, kv_cache_dtype: str = "auto") -> list[KVPages]:
    """Zero-filled page pools, one per layer, created directly on the device (or its shards); with
    kv_cache_dtype "int8" the pages are int8 and each layer has its K and V scales. Each pool has one page
    more than num_pages, never in a block table: padding tokens write there (slot num_pages * page_size), so
    a one-token write needs no bounds check (gpu.write_kv)."""
    quantized = kv_cache_dtype == "int8"
    num_pages += 1  # the spare page
    pages = kv_pages_shape(backend, num_pages, page_size, num_kv_heads, head_dim)
    specs = kv_specs(backend, quantized)

    def make(shape, dt, spec):
        return jax.jit(lambda: jnp.zeros(shape, dt),
                       out_shardings=NamedSharding(mesh, spec) if mesh is not None else None)

    page = make(pages, jnp.int8 if quantized else dtype, specs.k)
    if not quantized:
        return [KVPages(page(), page()) for _ in range(num_layers)]
    scale = make(kv_scales_shape(backend, num_pages, page_size, num_kv_heads), jnp.float32, specs.k_scale)
    return [KVPages(page(), page(), scale(), scale()) for _ in range(num_layers)]


def tensor_parallel() -> bool:
    """Whether the current (abstract) mesh splits the model over several devices: a Pallas call then runs per
    shard under shard_map, or not at all."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and dict(mesh.shape).get("model", 1) > 1


def paged_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv: KVPages,
    md: AttentionMetadata,
    *,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    backend: str,
) -> tuple[jax.Array, KVPages]:
    """Write this step's k, v [num_tokens, num_kv_heads, head_dim] into the pages, then attend.

    q: [num_tokens, num_heads, head_dim] -> [num_tokens, num_heads, head_dim]. Under a mesh whose `model`
    axis has several devices (tensor parallelism, `jax.set_mesh`), each device runs the implementation on
    its own heads and pages (shard_map): attention never mixes heads, so no communication is needed.
    """
    attend = functools.partial(_paged_attention, scale=scale, sliding_window=sliding_window, soft_cap=soft_cap,
                               backend=backend)
    if not tensor_parallel():
        return attend(q, k, v, kv, md)
    heads, specs = PartitionSpec(None, "model", None), kv_specs(backend, kv.k_scale is not None)
    return jax.shard_map(attend, in_specs=(heads, heads, heads, specs, PartitionSpec()),
                         out_specs=(heads, specs), check_vma=False)(q, k, v, kv, md)


def _paged_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv: KVPages, md: AttentionMetadata, *, scale: float,
                     sliding_window: int | None, soft_cap: float | None, backend: str) -> tuple[jax.Array, KVPages]:
    if backend in ("reference", "xla"):
        impl, write, extra = (reference if backend == "reference" else xla), reference.write_kv, {}
    else:  # both kernels use the kv-heads-first layout and its scatter
        impl = tpu if backend.startswith("pallas-tpu") else gpu
        write, extra = gpu.write_kv, {"interpret": backend.endswith("interpret")}
    if kv.k_scale is None:
        k_pages, v_pages = write(kv.k, kv.v, k, v, md.slot_mapping)
        new = KVPages(k_pages, v_pages)
    else:  # int8 pages: each new token's K and V quantized per KV head, its scales written beside it
        (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
        k_pages, v_pages = write(kv.k, kv.v, kq, vq, md.slot_mapping)
        k_scale, v_scale = write(kv.k_scale[..., None], kv.v_scale[..., None], ks, vs, md.slot_mapping)
        new = KVPages(k_pages, v_pages, k_scale[..., 0], v_scale[..., 0])
        extra = {**extra, "k_scale": new.k_scale, "v_scale": new.v_scale}
    if backend == "xla" and cpu.supported(q, new.k, md.max_query_len, kv.k_scale is not None):
        impl = cpu  # a decode step on a CPU: each key read once, no gathered copy of the pages
    out = impl.ragged_paged_attention(q, new.k, new.v, md.block_tables, md.seq_lens, md.query_start_loc,
                                      max_query_len=md.max_query_len, scale=scale, sliding_window=sliding_window,
                                      soft_cap=soft_cap, **extra)
    return out, new
