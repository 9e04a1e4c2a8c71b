"""The engine on a real GPU: parity of a tiny model through the whole engine, then start-up (load + compiling
every step shape) and throughput of a Llama-3.2-1B-shaped model with random bf16 weights.

    PYTHONPATH=. python benchmarks/engine_gpu.py [--quick]

Prints: the tiny model's greedy tokens against transformers; the 1B model's warm-up time and shape count; an
offline batch (requests x prompt / output tokens, greedy, ignore_eos): wall time, output and total tokens/s; the
median decode-step time at a given batch beside its floor (weights + KV bytes read / the copy bandwidth
measured in the same run).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import LLM, SamplingParams


def copy_bandwidth() -> float:
    """Read + write bytes per second of a 2 GiB device copy (median of 10)."""
    x = jnp.ones((1 << 30,), jnp.bfloat16)
    f = jax.jit(lambda a: a + 1)
    f(x).block_until_ready()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * x.nbytes / statistics.median(times)


def tiny_parity(tmp: Path) -> bool:
    from tests import tiny_models
    from tests.test_model_parity import prompts

    tok = tiny_models.build_tokenizer(tmp / "tok")
    hf = tiny_models.build_model("llama3.1", tmp / "tiny", tok)
    llm = LLM(str(tmp / "tiny"), dtype="float32", num_kv_pages=64, page_size=8, max_num_seqs=4,
              max_num_batched_tokens=64)
    batch = prompts(seed=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in batch],
                        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    ok = all(o.outputs[0].token_ids == tiny_models.hf_greedy(hf, p, 24) for p, o in zip(batch, outs))
    print(f"tiny llama3.1 through the engine (backend {llm.model.module.backend}): greedy-24 == transformers: {ok}")
    return ok


def build_1b(path: Path) -> int:
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                      num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                      head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True,
                                      rope_theta=500000.0, architectures=["LlamaForCausalLM"],
                                      torch_dtype="bfloat16")
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    model.save_pretrained(str(path))
    n = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return n


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--profile", action="store_true", help="cProfile the host side of each timed loop")
    args = ap.parse_args()
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}")
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ok = tiny_parity(tmp)
        n_params = build_1b(tmp / "1b")
        import shutil

        for f in (tmp / "tok").iterdir():  # the 1B model has no tokenizer: reuse the tiny one
            shutil.copy(f, tmp / "1b" / f.name)
        t0 = time.perf_counter()
        llm = LLM(str(tmp / "1b"), dtype="bfloat16", max_num_seqs=64, max_num_batched_tokens=2048,
                  max_model_len=2048, warmup=True)
        runner = llm.llm_engine.runner
        warm = runner.num_compilations
        print(f"1B model ({n_params / 1e9:.2f}B params, bf16): load + warm-up {time.perf_counter() - t0:.1f} s, "
              f"{len(runner.all_buckets())} step shapes ({warm} functions), {runner.num_pages} KV pages")
        rng = np.random.default_rng(0)
        num_req, prompt_len, out_len = (64, 128, 64) if args.quick else (256, 128, 128)
        prompts = [{"prompt_token_ids": rng.integers(3, 128000, prompt_len).tolist()} for _ in range(num_req)]
        params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
        llm.generate(prompts[:8], params, use_tqdm=False)  # first-use costs outside the timing
        engine = llm.llm_engine
        weight_bytes = 2 * n_params
        for mode in (False, True):
            engine.config.async_scheduling = mode
            step_times: list[float] = []
            for r, p in enumerate(prompts):
                engine.add_request(f"{mode}-{r}", p, params)
            prof = cProfile.Profile() if args.profile else None
            if prof:
                prof.enable()
            t0 = time.perf_counter()
            while engine.has_unfinished_requests():
                t = time.perf_counter()
                engine.step()
                dt = time.perf_counter() - t
                key = runner.last_bucket
                if key is not None and key[2] == 1 and len(engine.scheduler.running) == 64:
                    step_times.append(dt)
            wall = time.perf_counter() - t0
            if prof:
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(22)
            name = "async scheduling" if mode else "sync (launch, then wait)"
            print(f"[{name}] offline batch: {num_req} requests x {prompt_len} in / {out_len} out, greedy: "
                  f"{wall:.2f} s, {num_req * out_len / wall:.0f} output tok/s, "
                  f"{num_req * (prompt_len + out_len) / wall:.0f} total tok/s, compilations after warm-up: "
                  f"{runner.num_compilations - warm}")
            if step_times:
                med = statistics.median(step_times)
                avg_ctx = prompt_len + out_len / 2
                kv_bytes = 64 * avg_ctx * 2 * 16 * 8 * 64 * 2
                floor = (weight_bytes + kv_bytes) / bw
                print(f"[{name}] decode step at 64 sequences, ~{avg_ctx:.0f} context: median {med * 1e3:.2f} ms over "
                      f"{len(step_times)} steps; floor {floor * 1e3:.2f} ms (weights + KV / copy bandwidth) -> "
                      f"{floor / med:.0%}; {64 / med:.0f} tok/s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
