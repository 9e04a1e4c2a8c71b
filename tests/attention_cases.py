"""Random ragged paged-attention problems for the kernel tests, and a plain per-token numpy oracle."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.paged_attention import gpu, reference


@dataclasses.dataclass
class Case:
    q: np.ndarray  # [num_tokens + padding, num_heads, head_dim]
    k_pages: np.ndarray  # [num_pages, page_size, num_kv_heads, head_dim] (reference layout)
    v_pages: np.ndarray
    block_tables: np.ndarray  # [num_seqs + 1 padding sequence, width]
    seq_lens: np.ndarray
    query_start_loc: np.ndarray
    q_lens: list[int]
    kv_lens: list[int]
    tables: list[np.ndarray]  # each sequence's pages, unpadded

    @property
    def num_tokens(self) -> int:
        return sum(self.q_lens)

    @property
    def max_query_len(self) -> int:
        return 1 << max(self.q_lens).bit_length()


def make_case(rng: np.random.Generator, *, q_lens: list[int], kv_lens: list[int], page_size: int,
              num_kv_heads: int, group: int, head_dim: int, dtype=np.float32, spare_pages: int = 3) -> Case:
    """Sequences with the given query / KV lengths on shuffled (non-contiguous) pages of a small pool."""
    need = [-(-n // page_size) for n in kv_lens]
    num_pages = sum(need) + spare_pages
    pages = rng.permutation(num_pages)
    tables, used = [], 0
    for n in need:
        tables.append(pages[used:used + n])
        used += n
    width = max(need) + 1
    block_tables = np.zeros((len(kv_lens) + 1, width), np.int32)
    for s, t in enumerate(tables):
        block_tables[s, :len(t)] = t
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_pages = rng.standard_normal(shape).astype(dtype)
    v_pages = rng.standard_normal(shape).astype(dtype)
    num_tokens = sum(q_lens)
    q = rng.standard_normal((num_tokens + 3, num_kv_heads * group, head_dim)).astype(dtype)
    cu = np.concatenate([[0], np.cumsum(q_lens), [num_tokens]]).astype(np.int32)
    return Case(q, k_pages, v_pages, block_tables, np.asarray(list(kv_lens) + [0], np.int32), cu, list(q_lens),
                list(kv_lens), tables)


def naive_attention(case: Case, scale: float, window: int | None, soft_cap: float | None) -> np.ndarray:
    """[num_tokens, num_heads, head_dim] float64, one token and one head at a time."""
    q = case.q[:case.num_tokens].astype(np.float64)
    num_kv_heads, head_dim = case.k_pages.shape[2:]
    group = q.shape[1] // num_kv_heads
    out = np.zeros_like(q)
    t = 0
    for s, (n, kv_len) in enumerate(zip(case.q_lens, case.kv_lens)):
        k_seq = case.k_pages[case.tables[s]].reshape(-1, num_kv_heads, head_dim).astype(np.float64)
        v_seq = case.v_pages[case.tables[s]].reshape(-1, num_kv_heads, head_dim).astype(np.float64)
        for r in range(n):
            pos = kv_len - n + r
            lo = 0 if window is None else max(0, pos - window + 1)
            for h in range(q.shape[1]):
                k, v = k_seq[lo:pos + 1, h // group], v_seq[lo:pos + 1, h // group]
                scores = k @ q[t + r, h] * scale
                if soft_cap is not None:
                    scores = soft_cap * np.tanh(scores / soft_cap)
                p = np.exp(scores - scores.max())
                out[t + r, h] = (p / p.sum()) @ v
        t += n
    return out


TOL = {np.float32: 2e-5, jnp.bfloat16: 3e-2}  # float32: exact dots; bf16 inputs, probabilities and output


def run_kernel_and_reference(kernel, case: Case, *, window=None, soft_cap=None, **knobs):
    """(kernel output, reference output), both [num_tokens, num_heads, head_dim] float32, on the kernel's
    kv-heads-first page layout; the reference runs in float32 on the same (possibly bf16-rounded) inputs."""
    kw = dict(max_query_len=case.max_query_len, scale=case.q.shape[-1] ** -0.5, sliding_window=window,
              soft_cap=soft_cap)
    f32 = [jnp.asarray(x, jnp.float32) for x in (case.q, case.k_pages, case.v_pages)]
    ref = reference.ragged_paged_attention(*f32, case.block_tables, case.seq_lens, case.query_start_loc, **kw)
    out = kernel(jnp.asarray(case.q), gpu.to_layout(jnp.asarray(case.k_pages)), gpu.to_layout(jnp.asarray(case.v_pages)),
                 case.block_tables, case.seq_lens, case.query_start_loc, **kw, **knobs)
    return np.asarray(out, np.float32), np.asarray(ref)[:case.num_tokens]


def lowering_args(max_query_len: int, group: int, dtype) -> tuple:
    """Abstract arguments of a Llama-3-8B-shaped call (8 kv heads, head_dim 128, page 16, 512 pages)."""
    num_tokens, num_seqs = (64, 64) if max_query_len == 1 else (512, 8)
    pages = jax.ShapeDtypeStruct((8, 512, 16, 128), dtype)
    return (jax.ShapeDtypeStruct((num_tokens, 8 * group, 128), dtype), pages, pages,
            jax.ShapeDtypeStruct((num_seqs, 128), jnp.int32), jax.ShapeDtypeStruct((num_seqs,), jnp.int32),
            jax.ShapeDtypeStruct((num_seqs + 1,), jnp.int32))
