"""Where a decode call's time goes on the GPU: device time per kernel from a jax.profiler trace.

    PYTHONPATH=. python benchmarks/attention_profile.py [--out DIR]

For the four decode cases of attention_h100.py, bf16, 32 / 8 heads, head_dim 128, page 16,
our kernel with its default knobs and jax's deprecated kernel at its best setting from attention_h100.py run the
same `lax.scan` loop of calls that attention_h100.py times (a different set of pages each call). The trace is
parsed into: kernels per call, device busy time per call (sum of kernel durations), the loop's wall time per call,
and the longest kernels. Busy time below the wall time is time the device spent idle between kernels.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.7")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import attention_h100 as bench  # noqa: E402
from pallas_kernels.paged_attention import gpu  # noqa: E402


def trace_events(trace_dir: str) -> tuple[list[dict], list[dict]]:
    """Complete events ("ph": "X") of the perfetto trace under trace_dir: (on the GPU's processes, the rest)."""
    (path,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu_pids = {pid for pid, n in names.items() if "GPU" in n or "gpu" in n}
    if not gpu_pids:
        print(f"    (no GPU process in the trace; processes: {sorted(names.values())})")
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    return [e for e in complete if e["pid"] in gpu_pids], [e for e in complete if e["pid"] not in gpu_pids]


def device_events(trace_dir: str) -> list[dict]:
    """Complete events on the GPU's processes of the perfetto trace under trace_dir."""
    return trace_events(trace_dir)[0]


def profile(name: str, run, calls: int, reps: int, out: str) -> dict:
    jax.block_until_ready(run())
    walls = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        walls.append((time.perf_counter() - t0) / calls)
    trace_dir = tempfile.mkdtemp(dir=out, prefix=name.replace(" ", "_").replace("/", "_") + "_")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(reps):
            jax.block_until_ready(run())
    events = device_events(trace_dir)
    per_kernel = collections.defaultdict(list)
    for e in events:
        per_kernel[e["name"]].append(e["dur"])
    busy = sum(e["dur"] for e in events) / (reps * calls)
    top = sorted(per_kernel.items(), key=lambda kv: -sum(kv[1]))[:6]
    row = {"case": name, "wall_us": statistics.median(walls) * 1e6, "busy_us": busy,
           "kernels_per_call": len(events) / (reps * calls),
           "top": [(k[:70], len(v) / (reps * calls), statistics.median(v)) for k, v in top]}
    print(f"{name}: wall {row['wall_us']:.1f} us/call, device busy {busy:.1f} us/call, "
          f"{row['kernels_per_call']:.1f} kernels/call", flush=True)
    for k, n, d in row["top"]:
        print(f"    {n:5.2f}/call  median {d:8.1f} us  {k}", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    from jax.experimental.pallas.ops.gpu import paged_attention as old

    bw = bench.hbm_bandwidth()
    peak = bw.get("torch_copy_TBps", bw["jax_elementwise_TBps"])
    print(f"bandwidth {bw}")
    rng = np.random.default_rng(0)
    rows = []
    for batch, ctx, old_cfg in [(64, 2048, (8, 4)), (256, 1024, (8, 4)), (8, 8192, (8, 4)), (1, 4096, (4, 16))]:
        kv_bytes = 2 * batch * ctx * bench.KVH * bench.D * 2
        q, kp, vp, tables = bench.make_decode(rng, batch, ctx)
        lens = jnp.full((batch,), ctx, jnp.int32)
        cu = jnp.arange(batch + 1, dtype=jnp.int32)
        ours = functools.partial(gpu.ragged_paged_attention, max_query_len=1, scale=bench.SCALE)
        loop = bench.scan_loop(ours, [(q, kp, vp, tb, lens, cu) for tb in tables], 3)
        rows.append(profile(f"ours b={batch} ctx={ctx}", loop, len(tables), 10, args.out))
        kernel_us = rows[-1]["top"][0][2]
        print(f"    -> the attention kernel alone: {kv_bytes / kernel_us / 1e6:.2f} TB/s of KV "
              f"({kv_bytes / kernel_us / 1e6 / peak:.0%} of the copy); whole call on the device: "
              f"{kv_bytes / rows[-1]['busy_us'] / 1e6 / peak:.0%}", flush=True)
        rows[-1].update(kernel_TBps=kv_bytes / kernel_us / 1e6, copy_TBps=peak)
        jax_old = functools.partial(old.paged_attention, pages_per_compute_block=old_cfg[0], k_splits=old_cfg[1])
        loop = bench.scan_loop(lambda q, *a: jax_old(q * bench.SCALE, *a), [(q, kp, vp, tb, lens) for tb in tables], 3)
        rows.append(profile(f"jax-old b={batch} ctx={ctx} ppcb,k_splits={old_cfg}", loop, len(tables), 10, args.out))
        # The same calls dispatched one by one (no loop on the device), for the loop's own cost.
        f = jax.jit(ours)
        rows.append(profile(f"ours b={batch} ctx={ctx}, dispatched", lambda: [f(q, kp, vp, tb, lens, cu)
                                                                              for tb in tables][-1],
                            len(tables), 10, args.out))
    with open(os.path.join(args.out, "attention_profile.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
