"""jaxllm: LLM inference in JAX. `LLM(model).generate(prompts, SamplingParams(...))`, as in vLLM."""

import os

# transformers is used for configs and tokenizers only; its advice that torch is missing is noise here.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from jaxllm.config import ConfigError, EngineConfig, JaxLLMError, ModelConfig, ModelLoadError, configure_logging
from jaxllm.engine import LLM, LLMEngine
from jaxllm.sampling import CompletionOutput, Logprob, RequestOutput, SamplingParams

__version__ = "0.1.0"

configure_logging()

__all__ = ["LLM", "LLMEngine", "SamplingParams", "Logprob", "RequestOutput", "CompletionOutput", "EngineConfig", "ModelConfig",
           "JaxLLMError", "ConfigError", "ModelLoadError", "__version__"]
