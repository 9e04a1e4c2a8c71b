"""Run by tests/test_tensor_parallel.py in a fresh process with two host devices: the same requests through
one device and through tensor_parallel_size=2; prints the outputs as JSON."""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAXLLM_WARMUP", "0")

import jax  # noqa: E402

from jaxllm import LLM, SamplingParams  # noqa: E402


CONFIGS = {"xla": {"attention_backend": "xla"}, "pallas": {"attention_backend": "pallas"},
           # int4 weights (packed along sharded output dims) and an int8 KV cache with its sharded scales
           "xla-quantized": {"attention_backend": "xla", "quantization": "int4", "kv_cache_dtype": "int8"}}
TP2_ONLY = {"xla": {"num_scheduler_steps": 4}}  # the sharded engine also decodes 4 steps per launch there


def run(path: str, config: dict, tp2_only: dict) -> dict:
    assert len(jax.devices()) == 2
    prompts = [{"prompt_token_ids": [(7 * i + 3 * j) % 300 + 3 for j in range(n)]} for i, n in enumerate((5, 17, 40))]
    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=1.3)]
    result = {}
    for tp in (1, 2):
        llm = LLM(path, dtype="float32", num_kv_pages=32, page_size=8, max_num_seqs=4, max_num_batched_tokens=64,
                  tensor_parallel_size=tp, **config, **(tp2_only if tp == 2 else {}))
        if tp == 2:
            k = llm.llm_engine.runner.kv_caches[0].k
            assert len(k.sharding.device_set) == 2 and k.addressable_shards[0].data.shape != k.shape
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert llm.llm_engine.runner.num_multi_step_launches > 0 or not (tp == 2 and tp2_only)
        result[tp] = [{"ids": o.outputs[0].token_ids,
                       "lp": [e[t].logprob for t, e in zip(o.outputs[0].token_ids, o.outputs[0].logprobs or [])]}
                      for o in outs]
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps({name: run(sys.argv[1], config, TP2_ONLY.get(name, {}))
                                  for name, config in CONFIGS.items()}))
