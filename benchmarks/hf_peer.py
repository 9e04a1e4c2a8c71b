"""The peer on the same card: Hugging Face transformers `generate` (eager, bf16) on a model built from a config
with random weights, at the batch sizes given; prints output tokens/s per batch (median of --iters runs).

    PYTHONPATH=. python benchmarks/hf_peer.py --model benchmarks/models/llama-3.1-8b --batch-sizes 1 64 \
        --input-len 128 --output-len 128 [--save-result FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="directory with config.json")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--save-result", default=None)
    args = ap.parse_args()

    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(args.model)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16).eval()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}")
    results = []
    for b in args.batch_sizes:
        ids = torch.randint(16, config.vocab_size - 16, (b, args.input_len), device="cuda")
        kw = dict(max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False,
                  attention_mask=torch.ones_like(ids), pad_token_id=0)
        with torch.no_grad():
            model.generate(ids[:, :16], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
            times = []
            for _ in range(args.iters):
                torch.cuda.synchronize()
                t = time.perf_counter()
                out = model.generate(ids, **kw)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
        n_out = (out.shape[1] - args.input_len) * b
        med = statistics.median(times)
        results.append({"batch_size": b, "seconds": med, "output_tok_per_s": n_out / med})
        print(f"transformers eager generate, batch {b}, {args.input_len} in / {args.output_len} out: {med:.2f} s, "
              f"{n_out / med:.1f} output tok/s", flush=True)
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
