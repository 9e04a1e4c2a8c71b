"""Shared fixtures: tiny random Hugging Face models (one per architecture variant), the real SmolLM2 GGUF."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # torch slows 10x when it fights JAX for the 2 cores
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAXLLM_WARMUP", "0")  # step shapes compile when first used; test_engine checks warm-up

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import tiny_models  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return tiny_models.build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_tokenizer):
    """tiny_model(variant) -> (model_dir, torch model): saved once per session per variant."""
    cache: dict[str, tuple] = {}

    def get(variant: str, **save_kwargs):
        key = variant + repr(sorted(save_kwargs.items()))
        if key not in cache:
            path = tmp_path_factory.mktemp(variant.replace(".", "_"))
            cache[key] = (path, tiny_models.build_model(variant, path, tiny_tokenizer, **save_kwargs))
        return cache[key]

    return get


@pytest.fixture(scope="session")
def smollm_path():
    from jaxllm.weights.hub import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smollm_llm():
    """The embedded default model, loaded by jaxllm once for the session (float32 on CPU)."""
    from jaxllm import LLM

    return LLM(num_kv_pages=64)


@pytest.fixture(scope="session")
def smollm_quantized():
    """smollm_quantized(kind) -> the embedded model loaded with quantization=kind ("int8", "int4", "gguf"),
    once per session per kind (float32 activations, a 64-page pool)."""
    from jaxllm import LLM

    cache: dict = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = LLM(quantization=kind, num_kv_pages=64, max_num_seqs=4, max_num_batched_tokens=512)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def smollm_hf(smollm_path):
    """transformers' float32 import of the same GGUF, and its tokenizer: the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name,
                                                 dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)
    return model.eval(), tok
