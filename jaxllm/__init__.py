"""jaxllm: LLM inference in JAX. `LLM(model).generate(prompts, SamplingParams(...))`, as in vLLM."""

import os

# transformers is used for configs and tokenizers only; its advice that torch is missing is noise here.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# XLA:GPU replays a step's kernels as CUDA graphs only in runs of several; at batch 1 a quantized step launches
# ~780 kernels and left the H200 idle 40% of the time. Graphs of any size: int8 6.46 -> 4.44 ms/token
# (benchmarks/RESULTS.md). Read when jax first starts a backend, so set before any jax work; a user's own
# setting of the flag wins.
if "xla_gpu_graph_min_graph_size" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_graph_min_graph_size=1").strip()

from jaxllm.config import ConfigError, EngineConfig, JaxLLMError, ModelConfig, ModelLoadError, configure_logging
from jaxllm.engine import LLM, LLMEngine
from jaxllm.sampling import CompletionOutput, Logprob, RequestOutput, SamplingParams

__version__ = "0.1.0"

configure_logging()

__all__ = ["LLM", "LLMEngine", "SamplingParams", "Logprob", "RequestOutput", "CompletionOutput", "EngineConfig", "ModelConfig",
           "JaxLLMError", "ConfigError", "ModelLoadError", "__version__"]
