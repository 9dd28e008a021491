"""Evaluation: generation (here), perplexity and later few-shot / finetuning / vision-language evaluation."""
