"""Time to load the default model from its GGUF against the jaxllm (Orbax) checkpoint converted from it.

    python benchmarks/load_time.py [--model M] [--repeats 3]

Each figure is the median of `repeats` loads in fresh processes (so no cache in the process helps),
timed inside the process from just before load_model to the parameters being ready on the device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, time
import jax
from jaxllm.weights import load_model
t = time.perf_counter()
m = load_model(None if sys.argv[1] == "default" else sys.argv[1], dtype=sys.argv[2])
jax.block_until_ready(m.params)
print(json.dumps({"seconds": time.perf_counter() - t, "device": str(m.mesh.devices.flat[0])}))
"""


def time_load(model: str, dtype: str, repeats: int) -> tuple[float, str]:
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", CHILD, model, dtype], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return statistics.median(r["seconds"] for r in runs), runs[0]["device"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from jaxllm.weights import convert_checkpoint

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            ckpt = Path(tmp) / dtype
            convert_checkpoint(None if args.model == "default" else args.model, ckpt, dtype=dtype)
            src, device = time_load(args.model, dtype, args.repeats)
            dst, _ = time_load(str(ckpt), dtype, args.repeats)
            rows.append((dtype, src, dst))
    print(f"load time, median of {args.repeats} fresh processes, device {device}")
    print(f"{'dtype':10s} {'source (s)':>11s} {'jaxllm ckpt (s)':>16s} {'speed-up':>9s}")
    for dtype, src, dst in rows:
        print(f"{dtype:10s} {src:11.2f} {dst:16.2f} {src / dst:8.1f}x")


if __name__ == "__main__":
    main()
