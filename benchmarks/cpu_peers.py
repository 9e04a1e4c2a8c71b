"""jaxllm against llama.cpp and transformers on this CPU, in one run, on the embedded default model
(SmolLM2-135M-Instruct Q4_1 GGUF): prompt-processing and generation tokens/s at batch 1.

    python benchmarks/cpu_peers.py [--quantization none int8 int4] [--input-len 500] [--output-len 128] \
        [--llama-cpp-dir /tmp/llama_cpp_build] [--out DIR]

Every engine runs in its own process (this file with `--worker`), so jax, torch and llama.cpp never share one,
on the same prompt token ids (random, seeded) with greedy decoding and EOS ignored:
  jaxllm        per --quantization; float32 and bfloat16 are both timed on the first one and the faster
                (generation) dtype is used for the rest.
  llama.cpp     llama-cpp-python built from source into --llama-cpp-dir/venv (cached; the native build
                segfaults on this machine, so AVX-512 and OpenMP are off); skipped with a message if the build,
                the import or the run fails. Figures from llama.cpp's own counters (llama_perf_context).
  transformers  the GGUF dequantized to float32 by transformers, eager torch, model.generate.
Timing (jaxllm, transformers): after --warmup runs, --iters runs each of a 1-token and an --output-len-token
generate; prompt tok/s = input_len / median(t_1); generation tok/s counts decode steps only:
(output_len - 1) / (median(t_N) - median(t_1)). llama.cpp: n_p_eval / t_p_eval and n_eval / t_eval of the
--output-len run (its n_eval decode steps are output_len - 1 too), median over --iters runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LLAMA_CPP_VERSION = "0.3.36"
LLAMA_CPP_CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
                        "-DGGML_AVX512=OFF -DGGML_OPENMP=OFF")
ENGINES = ("jaxllm", "llama.cpp", "transformers")


# ---- timing shared by the workers -------------------------------------------------------------------------------

def time_runs(run: Callable[[int], float], spec: dict) -> dict:
    """Warm up, then alternate timed 1-token and output_len-token runs; the tok/s figures of the module docstring."""
    n_in, n_out = len(spec["prompt"]), spec["output_len"]
    for _ in range(spec["warmup"]):
        run(1)
        run(n_out)
    t1, tn = [], []
    for _ in range(spec["iters"]):
        t1.append(run(1))
        tn.append(run(n_out))
    m1, mn = statistics.median(t1), statistics.median(tn)
    return {"prompt_tok_per_s": n_in / m1, "gen_tok_per_s": (n_out - 1) / (mn - m1),
            "t_1_s": t1, "t_n_s": tn}


# ---- workers (each in its own process; only the standard library is imported at module level) -----------------

def worker_jaxllm(spec: dict) -> dict:
    """Every --quantization; float32 vs bfloat16 on the first one, the faster dtype on the rest."""
    import gc

    import jax
    from jaxllm import LLM, SamplingParams

    page = 16
    max_len = len(spec["prompt"]) + spec["output_len"]

    def measure(dtype: str, quantization: str) -> dict:
        llm = LLM(spec["model"], dtype=dtype, quantization=None if quantization == "none" else quantization,
                  max_model_len=max_len, num_kv_pages=-(-max_len // page) + 1, page_size=page, max_num_seqs=1,
                  enable_prefix_caching=False, warmup=False)
        prompt = [{"prompt_token_ids": spec["prompt"]}]

        def run(n: int) -> float:
            params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
            t = time.perf_counter()
            out = llm.generate(prompt, params, use_tqdm=False)
            elapsed = time.perf_counter() - t
            assert len(out[0].outputs[0].token_ids) == n
            return elapsed

        row = {"engine": "jaxllm", "dtype": dtype, "quantization": quantization, **time_runs(run, spec)}
        print(f"jaxllm {dtype} quantization={quantization}: prompt {row['prompt_tok_per_s']:.0f} tok/s, "
              f"generation {row['gen_tok_per_s']:.1f} tok/s", flush=True)
        return row

    def measure_and_free(dtype: str, quantization: str) -> dict:
        row = measure(dtype, quantization)
        gc.collect()  # the engine's buffers go before the next one loads
        return row

    first, *rest = spec["quantizations"]
    rows = [measure_and_free(dtype, first) for dtype in spec["dtypes"]]
    best = max(rows, key=lambda r: r["gen_tok_per_s"])["dtype"]
    rows += [measure_and_free(best, q) for q in rest]
    return {"rows": rows, "chosen_dtype": best, "version": jax.__version__}


def worker_llama_cpp(spec: dict) -> dict:
    """llama-cpp-python on the GGUF as stored: greedy generate() from token ids, llama.cpp's perf counters."""
    import llama_cpp

    llm = llama_cpp.Llama(spec["model"], n_ctx=spec["n_ctx"], n_threads=spec["threads"],
                          n_threads_batch=spec["threads"], verbose=False)
    ctx = llm.ctx

    def run(n: int) -> dict:
        llm.reset()  # no KV reuse from the previous run
        llama_cpp.llama_perf_context_reset(ctx)
        t = time.perf_counter()
        got = 0
        for _ in llm.generate(spec["prompt"], top_k=1, temp=0.0):
            got += 1
            if got == n:
                break
        elapsed = time.perf_counter() - t
        perf = llama_cpp.llama_perf_context(ctx)
        return {"wall_s": elapsed, "t_p_eval_ms": perf.t_p_eval_ms, "n_p_eval": perf.n_p_eval,
                "t_eval_ms": perf.t_eval_ms, "n_eval": perf.n_eval}

    for _ in range(spec["warmup"]):
        run(spec["output_len"])
    runs = [run(spec["output_len"]) for _ in range(spec["iters"])]
    prompt = statistics.median(r["n_p_eval"] / r["t_p_eval_ms"] * 1e3 for r in runs)
    gen = statistics.median(r["n_eval"] / r["t_eval_ms"] * 1e3 for r in runs)
    row = {"engine": "llama.cpp", "prompt_tok_per_s": prompt, "gen_tok_per_s": gen, "runs": runs}
    print(f"llama.cpp: prompt {prompt:.0f} tok/s, generation {gen:.1f} tok/s", flush=True)
    return {"rows": [row], "version": llama_cpp.__version__}


def worker_transformers(spec: dict) -> dict:
    """transformers' float32 import of the GGUF (as tests/conftest.py builds the reference), eager generate."""
    os.environ["TQDM_DISABLE"] = "1"  # the GGUF dequantization's progress bar
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    path = Path(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([spec["prompt"]])

    def run(n: int) -> float:
        with torch.inference_mode():
            t = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
            elapsed = time.perf_counter() - t
        assert out.shape[1] == ids.shape[1] + n
        return elapsed

    row = {"engine": "transformers", **time_runs(run, spec)}
    print(f"transformers: prompt {row['prompt_tok_per_s']:.0f} tok/s, generation {row['gen_tok_per_s']:.1f} tok/s",
          flush=True)
    return {"rows": [row], "version": torch.__version__}


WORKERS: dict[str, Callable[[dict], dict]] = {
    "jaxllm": worker_jaxllm, "llama.cpp": worker_llama_cpp, "transformers": worker_transformers}


# ---- orchestration ----------------------------------------------------------------------------------------------

def llama_cpp_python(build_dir: Path) -> Path | None:
    """The python of a venv with llama-cpp-python built from source (built once, then reused); None on failure."""
    venv = build_dir / "venv"
    python = venv / "bin" / "python"
    check = [str(python), "-c", f"import llama_cpp; assert llama_cpp.__version__ == {LLAMA_CPP_VERSION!r}"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    build_dir.mkdir(parents=True, exist_ok=True)
    log = build_dir / "build.log"
    print(f"building llama-cpp-python {LLAMA_CPP_VERSION} from source into {venv} (several minutes; log: {log})",
          flush=True)
    env = {**os.environ, "CMAKE_ARGS": LLAMA_CPP_CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
    steps = [[sys.executable, "-m", "venv", str(venv)],
             # --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS, and would hand back a native build
             ["nice", str(python), "-m", "pip", "install", "--no-cache-dir", "--no-binary", "llama-cpp-python",
              f"llama-cpp-python=={LLAMA_CPP_VERSION}"]]
    with open(log, "w") as f:
        for cmd in steps:
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode != 0:
                print(f"llama.cpp column skipped: `{' '.join(cmd)}` failed; see {log}", flush=True)
                return None
    if subprocess.run(check, capture_output=True).returncode != 0:
        print(f"llama.cpp column skipped: llama_cpp {LLAMA_CPP_VERSION} does not import from {python}", flush=True)
        return None
    return python


def run_worker(name: str, python: Path | str, spec: dict, scratch: Path) -> dict | None:
    """Run one engine's worker in a fresh process; its result, or None (with a message) if it failed."""
    spec_path, result_path = scratch / f"{name}.spec.json", scratch / f"{name}.result.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    t = time.perf_counter()
    proc = subprocess.run([str(python), __file__, "--worker", name, "--spec", str(spec_path),
                           "--result", str(result_path)], env=env)
    if proc.returncode != 0 or not result_path.exists():
        print(f"{name} column skipped: its worker exited with status {proc.returncode} (output above)", flush=True)
        return None
    print(f"{name}: {time.perf_counter() - t:.0f} s (load, warm-up, timed runs)", flush=True)
    return json.loads(result_path.read_text())


def cpu_model() -> str:
    """The 'model name' of /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_prompt(model: Path, length: int, seed: int) -> list[int]:
    """`length` token ids drawn uniformly (seeded) from [16, vocab_size - 16), vocab_size from the GGUF."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(model)
    arch = reader.get_field("general.architecture").contents()
    vocab = int(reader.get_field(f"{arch}.vocab_size").contents())
    return np.random.default_rng(seed).integers(16, vocab - 16, length).tolist()


def table(rows: list[dict], threads: int) -> str:
    """The markdown table: one row per engine configuration, generation relative to llama.cpp."""
    ref = next((r["gen_tok_per_s"] for r in rows if r["engine"] == "llama.cpp"), None)
    lines = ["| engine | config | prompt tok/s | generation tok/s | generation / llama.cpp |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["engine"] == "jaxllm":
            config = f"{r['dtype']}, quantization {r['quantization']}"
        elif r["engine"] == "llama.cpp":
            config = f"Q4_1 as stored, {threads} threads"
        else:
            config = f"float32 (dequantized GGUF), eager, {threads} threads"
        ratio = f"{r['gen_tok_per_s'] / ref:.2f}x" if ref else "n/a"
        lines.append(f"| {r['engine']} | {config} | {r['prompt_tok_per_s']:.0f} | {r['gen_tok_per_s']:.1f} | {ratio} |")
    return "\n".join(lines)


def version(dist: str) -> str:
    """The installed version of a distribution of this environment."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quantization", nargs="+", default=["none", "int8", "int4"],
                    help="jaxllm configurations; 'none' runs the weights unquantized")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                    help="jaxllm dtypes timed on the first quantization; the faster is used for the rest")
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES, help="default: all")
    ap.add_argument("--input-len", type=int, default=500, help="prompt tokens")
    ap.add_argument("--output-len", type=int, default=128, help="generated tokens (greedy, EOS ignored)")
    ap.add_argument("--iters", type=int, default=3, help="timed runs per figure (the median is reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp and torch threads")
    ap.add_argument("--n-ctx", type=int, default=1024, help="llama.cpp context")
    ap.add_argument("--seed", type=int, default=0, help="seeds the prompt token ids")
    ap.add_argument("--llama-cpp-dir", type=Path, default=Path("/tmp/llama_cpp_build"),
                    help="where the llama-cpp-python venv is built and cached")
    ap.add_argument("--out", type=Path, default=None, help="directory for cpu_peers.md and cpu_peers.json")
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        args.result.write_text(json.dumps(WORKERS[args.worker](json.loads(args.spec.read_text()))))
        return 0
    if args.output_len < 2 or args.input_len + args.output_len > args.n_ctx:
        ap.error("need --output-len >= 2 and --input-len + --output-len <= --n-ctx")

    start = time.perf_counter()
    from jaxllm.weights.hub import resolve_model

    model = resolve_model(None, None).path
    spec = {"model": str(model), "prompt": make_prompt(model, args.input_len, args.seed),
            "output_len": args.output_len, "iters": args.iters, "warmup": args.warmup, "threads": args.threads,
            "n_ctx": args.n_ctx, "quantizations": args.quantization, "dtypes": args.dtypes}
    cores = len(os.sched_getaffinity(0))
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_model(), "cores": cores,
            "load_avg_at_start": os.getloadavg(), "model": model.name, "input_len": args.input_len,
            "output_len": args.output_len, "iters": args.iters, "warmup": args.warmup, "threads": args.threads,
            "versions": {"python": platform.python_version(), "jax": version("jax"), "jaxlib": version("jaxlib"),
                         "torch": version("torch"), "transformers": version("transformers"),
                         "llama-cpp-python": "not run"}}
    rows: list[dict] = []
    jax_ok = True
    with tempfile.TemporaryDirectory(prefix="cpu_peers_") as tmp:
        for name in args.engines:
            python = llama_cpp_python(args.llama_cpp_dir) if name == "llama.cpp" else sys.executable
            result = run_worker(name, python, spec, Path(tmp)) if python else None
            if name == "jaxllm":
                jax_ok = result is not None
                if result:
                    meta["jaxllm_chosen_dtype"] = result["chosen_dtype"]
            if name == "llama.cpp" and result:
                meta["versions"]["llama-cpp-python"] = result["version"]
            rows += result["rows"] if result else []
    meta["total_s"] = time.perf_counter() - start
    meta["load_avg_at_end"] = os.getloadavg()

    v = meta["versions"]
    report = "\n".join([
        f"{meta['date']}, {meta['cpu']}, {cores} cores (shared with other processes: indicative figures; 1-minute "
        f"load average {meta['load_avg_at_start'][0]:.2f} at start, {meta['load_avg_at_end'][0]:.2f} at end), "
        f"{model.name}, batch 1, {args.input_len}-token prompt (random ids), {args.output_len} greedy tokens, "
        f"median of {args.iters} runs after {args.warmup} warm-up.",
        f"Versions: jax {v['jax']}, llama-cpp-python {v['llama-cpp-python']}, torch {v['torch']}, "
        f"transformers {v['transformers']}, Python {v['python']}.",
        "Generation tok/s counts decode steps only (jaxllm, transformers: (t_N - t_1) / (N - 1); llama.cpp: its "
        "own eval counters); prompt tok/s: jaxllm, transformers: prompt length / time of a 1-token generate; "
        "llama.cpp: its prompt-eval counters.",
        f"jaxllm dtype of the quantized rows: {meta.get('jaxllm_chosen_dtype', 'n/a')} (the faster generation of "
        f"{' and '.join(args.dtypes)} at quantization {args.quantization[0]}).",
        "",
        table(rows, args.threads),
        "",
        f"Whole script: {meta['total_s']:.0f} s.",
    ])
    print("\n" + report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cpu_peers.md").write_text(report + "\n")
        (args.out / "cpu_peers.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
        print(f"wrote {args.out / 'cpu_peers.md'} and {args.out / 'cpu_peers.json'}")
    return 0 if jax_ok else 1


if __name__ == "__main__":
    sys.exit(main())
