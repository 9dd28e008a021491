"""Using a trained model: labelled-task scoring (zero/few-shot, causal or encoder placement), perplexity, KV-cached
generation, reports, in-loop downstream scoring, the lm-evaluation-harness bridge; one inference seam
(eval/inference.py) under all of them."""
