"""End-to-end check on a real GPU: every architecture's tiny random model through the Pallas GPU kernel
(`attention_backend="auto"` on a GPU) against transformers (torch) and against our jnp reference backend.

    PYTHONPATH=. python benchmarks/gpu_model_check.py

Prints, per architecture, the relative logits error of each backend against transformers (float32 on the
GPU: the kernel uses exact float32 dots) and whether 32 greedy tokens match transformers' generate.
"""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

import jax
import torch

from jaxllm import LLM, SamplingParams
from jaxllm.weights import load_model
from tests import tiny_models
from tests.test_model_parity import prompts, ragged_logits, rel_err, shuffled_tables


def main() -> int:
    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32 in the model's own matmuls
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, torch {torch.__version__}")
    torch.set_num_threads(4)
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        tok = tiny_models.build_tokenizer(Path(tmp) / "tok")
        for variant in tiny_models.VARIANTS:
            path = Path(tmp) / variant
            hf = tiny_models.build_model(variant, path, tok)
            batch = prompts()
            tables = shuffled_tables(random.Random(1), 32, [len(p) for p in batch])
            errs = {}
            for backend in ("auto", "reference"):
                loaded = load_model(path, dtype="float32", attention_backend=backend)
                ours = ragged_logits(loaded, [(p, 0, t) for p, t in zip(batch, tables)], num_pages=32)
                errs[loaded.module.backend] = max(rel_err(o, tiny_models.hf_logits(hf, p).numpy())
                                                  for p, o in zip(batch, ours))
            llm = LLM(str(path), dtype="float32", num_kv_pages=64, page_size=8, warmup=False)
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts(seed=5)],
                                SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
            same = all(o.outputs[0].token_ids == tiny_models.hf_greedy(hf, p, 32)
                       for p, o in zip(prompts(seed=5), outs))
            ok = same and all(e < 1e-4 for e in errs.values())
            failures += not ok
            print(f"{variant:9s} backend={llm.model.module.backend:11s} logits rel err "
                  + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
                  + f" greedy-32 match={same} {'OK' if ok else 'FAIL'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
