"""jaxllm: LLM inference in JAX. `LLM(model).generate(prompts, SamplingParams(...))`, as in vLLM."""

from jaxllm.config import ConfigError, EngineConfig, JaxLLMError, ModelConfig, ModelLoadError
from jaxllm.engine import LLM
from jaxllm.sampling import CompletionOutput, RequestOutput, SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineConfig", "ModelConfig",
           "JaxLLMError", "ConfigError", "ModelLoadError", "__version__"]
