"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers' float32 import of the file."""

from __future__ import annotations

import numpy as np
import torch

from jaxllm import SamplingParams
from jaxllm.runner import SeqInput, prepare_batch

PROMPT = "The capital of France is"
# transformers 5.24, float32, greedy (FIELD-NOTES): ids of PROMPT and the 20-token continuation.
PROMPT_IDS = [504, 3575, 282, 4649, 314]
CONTINUATION = " Paris.\n\nThe answer is: 2018-01-22 "
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Name a color."}],
]


def test_config_from_gguf(smollm_llm):
    c = smollm_llm.model.config
    assert (c.architecture, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (
        "LlamaForCausalLM", 30, 576, 9, 3, 64, 49152)
    assert c.tie_word_embeddings and c.ropes[0].theta == 100000.0
    assert smollm_llm.get_tokenizer().decode(list(c.eos_token_ids)) == "<|im_end|>"


def test_greedy_continuation(smollm_llm, smollm_hf):
    out = smollm_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    assert out.prompt_token_ids == PROMPT_IDS
    assert out.outputs[0].text == CONTINUATION
    hf, _ = smollm_hf
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPT_IDS]), max_new_tokens=20, do_sample=False)[0, 5:].tolist()
    assert out.outputs[0].token_ids == ref


def test_logits_match_transformers(smollm_llm, smollm_hf):
    hf, tok = smollm_hf
    ids = tok.encode("Paged attention stores keys and values in pages of sixteen tokens; a block table maps them.")
    loaded = smollm_llm.model
    input_ids, positions, md, _ = prepare_batch([SeqInput(ids, 0, list(range(8)))], 16, 64, 8)
    logits, _ = loaded.module.apply({"params": loaded.params}, input_ids, positions, smollm_llm.llm_engine.runner.kv_caches, md)
    ours = np.asarray(logits)[:len(ids)]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) < 1e-4


def test_chat_template_as_transformers(smollm_llm, smollm_hf):
    _, ref_tok = smollm_hf
    ours = smollm_llm.get_tokenizer()
    for conv in CONVERSATIONS:
        for gen in (True, False):
            text = ours.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert text == ref_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert ours.encode(text) == ref_tok.encode(text)
    assert text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n")


def test_chat_reply(smollm_llm, smollm_hf):
    hf, ref_tok = smollm_hf
    out = smollm_llm.chat(CONVERSATIONS[0], SamplingParams(temperature=0, max_tokens=30))[0]
    assert out.outputs[0].text == "The capital of France is Paris."
    assert out.outputs[0].finish_reason == "stop"  # ended by <|im_end|>, the GGUF's EOS
    ids = ref_tok.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False)[0, len(ids):].tolist()
    assert out.outputs[0].token_ids == ref
