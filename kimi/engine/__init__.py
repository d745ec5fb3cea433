"""The inference engine: token ids in, token ids out (text only when a tokenizer is attached).

Layered like vLLM and nano-vllm, with their vocabulary: Sequence -> BlockManager + StatePool -> Scheduler ->
ModelRunner (per-step context, model forward, sampling) -> LLMEngine / LLM. See ../shared/reference/serving.md.
"""
