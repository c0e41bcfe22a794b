"""Inference: generation with a preallocated KV cache, sampling, int8 weights, perplexity.

    from cpmctl.infer import load_for_inference, TextGenerator, Prompt, GenerationSettings
    model, tokenizer = load_for_inference("work/model", dtype="bf16")
    generator = TextGenerator(model, tokenizer, GenerationSettings(max_new_tokens=64))
    for completion in generator.complete([Prompt("今天天气很好，")]):
        print(completion.text)

Benchmarks time the token level on any fp32 model:

    model = prepare_for_inference(build_model(cfg), dtype="bf16")   # or quantize="int8"
    result = generate_tokens(model, [prompt_ids], GenerationSettings(max_new_tokens=128),
                             eod_id=None, pad_id=0)
    result.prefill_s, result.decode_s, result.tokens_per_s, result.rows[0].tokens

Modules, bottom up: cache.py (the KV cache), sampling.py (next-token choice), planned.py (a
GPT's prefill and decoding steps planned once, with cpmctl's C attention, kernels/attention.py),
generate.py (token ids in, token ids and timings out), text.py and infill.py (prompts and
completions), packed.py and quantize.py (weight layouts for the CPU's kernels: fp32/bf16,
int8), load.py (artifact -> model in a precision), perplexity.py (held-out quality of a
precision).
"""

from cpmctl.infer.cache import KVCache
from cpmctl.infer.generate import BatchResult, GenerationSettings, RowResult, generate_tokens
from cpmctl.infer.load import load_for_inference, prepare_for_inference
from cpmctl.infer.perplexity import perplexity
from cpmctl.infer.quantize import Int8Linear, quantize_int8
from cpmctl.infer.sampling import SamplingSettings
from cpmctl.infer.text import Completion, Prompt, TextGenerator

__all__ = ["BatchResult", "Completion", "GenerationSettings", "Int8Linear", "KVCache", "Prompt",
           "RowResult", "SamplingSettings", "TextGenerator", "generate_tokens",
           "load_for_inference", "perplexity", "prepare_for_inference", "quantize_int8"]
