"""tensor_parallel_size=2 on two host devices gives the one-device output (a fresh process: the device count
is fixed when jax starts)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_tensor_parallel_equals_one_device(tiny_model):
    """Through the CPU path (xla; sharded, also 4 decode steps per launch), the GPU kernel in interpret mode
    (pallas), both under shard_map, and with int4 weights and an int8 KV cache."""
    path, _ = tiny_model("llama3.1")
    proc = subprocess.run([sys.executable, "-m", "tests.tp_check", str(path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULT ", 1)[1])
    for backend in ("xla", "pallas", "xla-quantized"):
        one, two = results[backend]["1"], results[backend]["2"]
        assert [r["ids"] for r in two] == [r["ids"] for r in one], backend
        for a, b in zip(one, two):
            assert b["lp"] == pytest.approx(a["lp"], abs=1e-4)


def test_tensor_parallel_needs_devices_and_divisible_heads(tiny_model):
    from jaxllm import LLM
    from jaxllm.config import ModelConfig
    from jaxllm.sharding import check_tensor_parallel
    from tests.tiny_models import make_config

    path, _ = tiny_model("llama3.1")
    with pytest.raises(ValueError, match="tensor_parallel_size=2 but only 1 device"):
        LLM(str(path), tensor_parallel_size=2)
    config = ModelConfig.from_hf(make_config("llama3.1"))  # 4 heads, 2 KV heads
    check_tensor_parallel(config, 2)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 must divide the model's num_key_value_heads \(2\)"):
        check_tensor_parallel(config, 4)
