"""Data tools: real corpora, SentencePiece tokenizer, Megatron-compatible indexed datasets, semi-causal samples.

Data flows one way: raw text -> jsonl (corpora) -> tokens on disk (preprocess) -> samples (datasets).
Heavy libraries (torch, megatron-core) are imported lazily so that every command's --help answers at once.
"""
