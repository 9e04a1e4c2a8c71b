"""Configuration: `ModelConfig` (what the checkpoint describes), `EngineConfig` (how we run it), environment.

`ModelConfig` is normalised from a transformers config object, which fills the defaults a config.json
leaves out and reads both the old (`rope_theta` / `rope_scaling`) and the new (`rope_parameters`) rope
formats. Every environment variable jaxllm reads is read here.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp

from jaxllm.attention import BACKENDS, KV_CACHE_DTYPES

# architectures name -> model family (one file per family under jaxllm/models/).
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "llama",
    "Gemma2ForCausalLM": "gemma",
    "Gemma3ForCausalLM": "gemma",
}

ROPE_TYPES = ("default", "linear", "llama3", "yarn")
ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new")
# "auto" and "pallas" pick per platform (jaxllm.attention.resolve_backend); the others (attention.BACKENDS)
# force one implementation, e.g. a kernel in its interpreter on a CPU (tests, debugging).
ATTENTION_BACKENDS = ("auto", "pallas", *BACKENDS)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16",
                 "half": "float16", "float": "float32"}


class JaxLLMError(Exception):
    """Base of the errors jaxllm raises for bad input; the CLI prints their message without a traceback."""


class ConfigError(JaxLLMError, ValueError):
    """A model or engine configuration that jaxllm cannot run; the message says what to change."""


class ModelLoadError(JaxLLMError, OSError):
    """A model that cannot be found, downloaded or read; the message says which file and what to do."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer: `theta` and an optional scaling (HF's rope_parameters)."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int | None = None  # llama3, yarn
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    attention_factor: float | None = None  # yarn
    truncate: bool = True  # yarn
    freq_factors: tuple[float, ...] | None = None  # GGUF `rope_freqs.weight`: inv_freq is divided by these

    @classmethod
    def from_hf(cls, params: dict[str, Any], max_position_embeddings: int) -> "RopeConfig":
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope_type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in params.items() if k in known and v is not None}
        kwargs["theta"] = float(params["rope_theta"])
        kwargs["rope_type"] = rope_type
        if float(params.get("partial_rotary_factor") or 1.0) != 1.0:
            raise ConfigError("partial_rotary_factor != 1 is not supported")
        if rope_type == "yarn":
            kwargs.setdefault("original_max_position_embeddings", max_position_embeddings)
            kwargs.setdefault("factor", max_position_embeddings / kwargs["original_max_position_embeddings"])
        return cls(**kwargs)


# Weight-only quantization, load_model's `quantization`: "int8" (one scale per output channel) and "int4" (a
# scale and zero per group of up to 128 inputs) quantize the float weights at load; "awq" (a Hugging Face AWQ
# checkpoint, found from its config.json when None) and "gguf" (a GGUF file's Q4_0/Q4_1/Q8_0 blocks) keep the
# checkpoint's own quantized weights. LAYER_QUANTIZATIONS: how the linear layers hold them (the latter two load
# into int4 / int8).
QUANTIZATIONS = ("int8", "int4", "awq", "gguf")
LAYER_QUANTIZATIONS = ("int8", "int4")
# How quantized kernels are laid out on the devices (pallas_kernels/quant_matmul/reference.py): "kn" as
# checkpoints store [in, out]; "nk" transposed, for Hopper GPUs (load_model's quant_layout="auto" picks it there).
QUANT_LAYOUTS = ("kn", "nk")


def check_quantization(quantization: str | None) -> None:
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATIONS)} or None, got {quantization!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the model code needs to know about one checkpoint, normalised across families."""

    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_windows: tuple[int | None, ...]  # per layer; None = full attention
    ropes: tuple[RopeConfig, ...]  # per layer
    query_pre_attn_scalar: float | None  # attention scale is this ** -0.5 (else head_dim ** -0.5)
    attn_logit_softcap: float | None
    final_logit_softcap: float | None
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    checkpoint_dtype: str  # the dtype the weights were stored in ("bfloat16", "float32", ...)
    hf_config: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)
    quantization: str | None = None  # how the linear layers hold their weights (LAYER_QUANTIZATIONS); None: float
    quant_group_size: int | None = None  # inputs per scale; None: int8 per channel, int4 128 (from GGUF: 32)
    lm_head_int8: bool = False  # the LM head in int8, one scale per vocab entry (a tied embedding: its own copy)
    quant_layout: str = "kn"  # QUANT_LAYOUTS: the quantized kernels as [in, out] or transposed ("nk")

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                              f"({self.num_kv_heads})")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
        if len(self.sliding_windows) != self.num_layers or len(self.ropes) != self.num_layers:
            raise ConfigError("layer_types must name one attention type per layer")
        if self.quantization not in (None, *LAYER_QUANTIZATIONS):
            raise ConfigError(f"ModelConfig.quantization must be one of {', '.join(LAYER_QUANTIZATIONS)} or None, "
                              f"got {self.quantization!r}")
        if self.quant_layout not in QUANT_LAYOUTS:
            raise ConfigError(f"quant_layout must be one of {', '.join(QUANT_LAYOUTS)}, got {self.quant_layout!r}")

    @property
    def norm_plus_one(self) -> bool:
        """Gemma's RMSNorm scales by (1 + w); its checkpoints store w."""
        return self.family == "gemma"

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @classmethod
    def from_hf(cls, hf: Any, *, eos_token_ids: tuple[int, ...] = ()) -> "ModelConfig":
        """Normalise a transformers `PretrainedConfig`; unsupported architectures raise `ConfigError`."""
        archs = getattr(hf, "architectures", None) or []
        if not archs:
            raise ConfigError("config.json has no 'architectures' entry, so the model family is unknown; "
                              f"supported: {', '.join(ARCHITECTURES)}")
        arch = archs[0]
        if arch not in ARCHITECTURES:
            raise ConfigError(f"architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
        family = ARCHITECTURES[arch]
        if getattr(hf, "use_bidirectional_attention", False):
            raise ConfigError("use_bidirectional_attention (embedding models) is not supported; jaxllm runs causal LMs")
        num_layers = hf.num_hidden_layers
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        max_pos = int(getattr(hf, "max_position_embeddings", 0) or 0)

        layer_types = getattr(hf, "layer_types", None)
        if layer_types is None:
            layer_types = ["sliding_attention" if getattr(hf, "sliding_window", None) else "full_attention"] * num_layers
        if len(layer_types) != num_layers:
            raise ConfigError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
        windows = tuple(hf.sliding_window if t == "sliding_attention" else None for t in layer_types)

        rope_params = getattr(hf, "rope_parameters", None) or {
            "rope_theta": getattr(hf, "rope_theta", 10000.0), **(getattr(hf, "rope_scaling", None) or {})}
        if set(rope_params) <= {"full_attention", "sliding_attention"}:  # per layer type (Gemma 3)
            by_type = {t: RopeConfig.from_hf(p, max_pos) for t, p in rope_params.items()}
            ropes = tuple(by_type[t] for t in layer_types)
        else:
            ropes = (RopeConfig.from_hf(rope_params, max_pos),) * num_layers

        model_type = hf.model_type
        qwen2 = model_type == "qwen2"
        attention_bias = bool(getattr(hf, "attention_bias", False))
        act = getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", "silu")
        eos = tuple(eos_token_ids) or _as_tuple(getattr(hf, "eos_token_id", None))
        return cls(
            architecture=arch,
            family=family,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=num_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.rms_norm_eps),
            hidden_act=act,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=qwen2 or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            sliding_windows=windows,
            ropes=ropes,
            query_pre_attn_scalar=getattr(hf, "query_pre_attn_scalar", None),
            attn_logit_softcap=getattr(hf, "attn_logit_softcapping", None),
            final_logit_softcap=getattr(hf, "final_logit_softcapping", None),
            eos_token_ids=eos,
            bos_token_id=getattr(hf, "bos_token_id", None),
            checkpoint_dtype=_dtype_name(getattr(hf, "dtype", None)),
            hf_config=hf,
        )


def _as_tuple(x: Any) -> tuple[int, ...]:
    if x is None:
        return ()
    return tuple(int(i) for i in x) if isinstance(x, (list, tuple)) else (int(x),)


def _dtype_name(d: Any) -> str:
    name = str(d or "float32").removeprefix("torch.")
    return DTYPE_ALIASES.get(name, name)


def resolve_dtype(dtype: str | Any, model_config: ModelConfig, platform: str) -> Any:
    """`dtype="auto"`: the checkpoint's dtype on an accelerator, float32 on CPU (XLA:CPU has no fast bf16)."""
    if dtype is None or dtype == "auto":
        if platform == "cpu":
            return jnp.float32
        name = model_config.checkpoint_dtype
        return DTYPES.get(name, jnp.bfloat16) if name != "float32" else jnp.bfloat16
    return DTYPES[check_dtype(dtype)]


def check_dtype(dtype: str | Any) -> str:
    """The canonical name of a requested dtype ("auto" stays "auto"); unsupported ones raise ConfigError."""
    if dtype is None or dtype == "auto":
        return "auto"
    if not isinstance(dtype, str):
        dtype = jnp.dtype(dtype).name
    name = DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of auto, {', '.join(DTYPES)}")
    return name


SCHEDULING_POLICIES = ("fcfs", "priority")


@dataclasses.dataclass
class EngineConfig:
    """Every knob of the engine, validated once here (messages name the field)."""

    max_model_len: int | None = None  # None: the model's max_position_embeddings, capped by the KV pool
    page_size: int = 16
    num_kv_pages: int | None = None  # None: sized from memory_utilization (accelerators) / cpu_kv_cache_bytes
    memory_utilization: float = 0.9  # fraction of accelerator memory for params + KV pages
    cpu_kv_cache_bytes: int = 1 << 30  # KV pool size on CPU, where free memory is not measured
    max_num_seqs: int = 64  # sequences in one step (and decode buckets up to this)
    max_num_batched_tokens: int = 2048  # tokens in one step (the chunked-prefill budget)
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"  # or "priority" (lower value first, then arrival)
    tensor_parallel_size: int = 1
    attention_backend: str = "auto"
    kv_cache_dtype: str = "auto"  # "auto": the model's dtype; "int8": int8 pages, a float32 scale per token and head
    seed: int = 0  # seeds the per-request seeds of requests that give none
    async_scheduling: bool = True  # launch step N+1 before processing step N's output on the host
    # decode steps per launch when every running sequence decodes (vLLM's multi-step scheduling): the host's
    # per-launch cost is paid once per this many tokens. None: runner.scheduler_steps picks (8 for quantized weights
    # on a GPU, where the 8B's batch-1 decode went 5.28 -> 3.26 ms/token; else 1)
    num_scheduler_steps: int | None = None
    warmup: bool | None = None  # compile every step shape at start-up; None: JAXLLM_WARMUP (default on)
    log_stats_interval: float = 5.0  # seconds between "running/waiting, tokens/s, KV usage" log lines

    def __post_init__(self) -> None:
        env_backend = os.environ.get("JAXLLM_ATTENTION_BACKEND")
        if env_backend:
            self.attention_backend = env_backend
        if self.warmup is None:
            self.warmup = os.environ.get("JAXLLM_WARMUP", "1").lower() not in ("0", "false", "no")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                              f"got {self.attention_backend!r}")
        for name in ("page_size", "max_num_seqs", "max_num_batched_tokens", "cpu_kv_cache_bytes",
                     "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_scheduler_steps is not None and self.num_scheduler_steps < 1:
            raise ConfigError(f"num_scheduler_steps must be >= 1, got {self.num_scheduler_steps}")
        if self.page_size & (self.page_size - 1):
            raise ConfigError(f"page_size must be a power of two, got {self.page_size}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                              f"({self.max_num_seqs}): every running sequence needs a token in a step")
        if self.num_kv_pages is not None and self.num_kv_pages < 1:
            raise ConfigError(f"num_kv_pages must be >= 1, got {self.num_kv_pages}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if not 0.0 < self.memory_utilization <= 1.0:
            raise ConfigError(f"memory_utilization must be in (0, 1], got {self.memory_utilization}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ConfigError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, "
                              f"got {self.scheduling_policy!r}")


def enable_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache, so a restart skips compiling the step shapes.

    JAXLLM_COMPILATION_CACHE: its directory (default ~/.cache/jaxllm/xla), or "off". Returns the directory."""
    import jax

    path = os.environ.get("JAXLLM_COMPILATION_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxllm",
                                                                   "xla"))
    if path.lower() in ("off", "0", "none", ""):
        return None
    if jax.config.jax_compilation_cache_dir is None:  # an application's own setting wins
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return jax.config.jax_compilation_cache_dir


def configure_logging() -> None:
    """Give the "jaxllm" logger its own stderr handler at INFO (start-up progress, periodic stats), as vLLM
    does, unless JAXLLM_CONFIGURE_LOGGING=0 (then the application's logging configuration decides)."""
    import logging

    logger = logging.getLogger("jaxllm")
    if os.environ.get("JAXLLM_CONFIGURE_LOGGING", "1").lower() in ("0", "false", "no") or logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s jaxllm: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def use_modelscope() -> bool:
    """JAXLLM_USE_MODELSCOPE=1 resolves hub ids through ModelScope instead of Hugging Face."""
    return os.environ.get("JAXLLM_USE_MODELSCOPE", "").lower() in ("1", "true", "yes")
