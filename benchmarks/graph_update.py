"""What makes XLA:GPU re-record a step's CUDA graph ("command_buffer::update" on the host), and what it costs.

    PYTHONPATH=. python benchmarks/graph_update.py [--layers 300] [--out DIR]

A decode step is a few hundred small kernels whose CUDA graph XLA replays; when an address the graph uses
changes between calls, XLA updates the graph before the launch. At batch 1 on the 8B shape that update and
the launch after it took ~3.5 ms of host time per step (benchmarks/decode_profile.py), more than the device
needs. This toy has the same shape: `--layers` matmul + elementwise pairs on a donated state, with a small
per-call input `x`. Cases (host time per call = wall of synchronous calls, median; the profile counts graph
updates per call):

- same x: the same x array every call (every address stable);
- new x, 1 reader: a fresh x every call, read by the first layer only;
- new x, all read: a fresh x every call, read by every layer (what a step's attention metadata is);
- new x, barrier: as "all read", but x is materialized once behind an optimization barrier first;
- no donation: same x, the state not donated (a fresh output buffer every call).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.attention_profile import trace_events

D = 256


def make_step(layers: int, readers: str):
    def step(params, state, x):  # params [layers, D, D]; state [8, D]; x [8] float32
        if readers == "barrier":
            x = jax.lax.optimization_barrier(x * 1.0)
        h = state
        for i in range(layers):
            h = jnp.tanh(h @ params[i])
            if readers != "one" or i == 0:
                h = h + x[i % x.shape[0]]
        return h
    return step


def run_case(name: str, layers: int, calls: int) -> dict:
    readers = {"same x": "all", "new x, 1 reader": "one", "new x, all read": "all",
               "new x, barrier": "barrier", "no donation": "all"}[name]
    donate = name != "no donation"
    fresh_x = name.startswith("new x")
    fn = jax.jit(make_step(layers, readers), donate_argnums=(1,) if donate else ())
    params = jnp.full((layers, D, D), 0.01, jnp.float32)
    state = jnp.ones((8, D), jnp.float32)
    host_x = np.arange(8, dtype=np.float32) * 1e-3
    x = jnp.asarray(host_x)

    def one():
        nonlocal state
        state = fn(params, state, jnp.asarray(host_x) if fresh_x else x)
        state.block_until_ready()

    for _ in range(5):
        one()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        one()
        times.append(time.perf_counter() - t)
    trace_dir = tempfile.mkdtemp(prefix="graph_update_")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(10):
            one()
    device, host = trace_events(trace_dir)
    by_name = collections.defaultdict(list)
    for e in host:
        if e["name"].startswith(("command_buffer::", "cuGraph")):
            by_name[e["name"]].append(e["dur"])
    row = {"case": name, "layers": layers, "wall_us": statistics.median(times) * 1e6,
           "device_busy_us": sum(e["dur"] for e in device) / 10,
           "host": {k: (len(v) / 10, statistics.median(v)) for k, v in by_name.items()}}
    print(f"{name:18s} wall {row['wall_us']:8.1f} us/call, device busy {row['device_busy_us']:7.1f} us/call; " +
          "; ".join(f"{k} {n:.1f}x {d:.0f} us" for k, (n, d) in sorted(row["host"].items())), flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=300)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    rows = [run_case(name, args.layers, args.calls)
            for name in ["same x", "new x, 1 reader", "new x, all read", "new x, barrier", "no donation"]]
    with open(os.path.join(args.out, "graph_update.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
