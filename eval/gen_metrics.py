"""Metrics of generated text, from the libraries that define them (nothing re-written here):

- `exact_match`: lm-evaluation-harness' `exact_match` (its `exact_match_hf_evaluate`, Hugging Face evaluate's rule:
  the strings equal, no normalisation unless asked), what lm-eval's `generate_until` tasks report;
- `squad_em` / `f1`: SQuAD's exact match and token F1 after SQuAD's normalisation (lower case, no punctuation, no
  articles, single spaces), torchmetrics' implementation of the official SQuAD v1.1 script; per item, averaged;
- `rougeL`: ROUGE-L F-measure, Google's `rouge-score` (stemming on, as the paper's summarisation numbers);
- `bleu` / `chrf`: corpus BLEU and chrF, `sacrebleu` with its default settings (13a tokenisation).
All are on a 0-1 scale except BLEU and chrF, which sacrebleu gives in 0-100 (kept, as every paper reports them).
"""
from __future__ import annotations

from typing import Sequence

METRICS = ("exact_match", "squad_em", "f1", "rougeL", "bleu", "chrf")


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    from lm_eval.api.metrics import exact_match_hf_evaluate

    return [float(exact_match_hf_evaluate([p], [r])["exact_match"]) for p, r in zip(predictions, references)]


def squad_scores(predictions: Sequence[str], references: Sequence[str]) -> tuple[list[float], list[float]]:
    """Per item (SQuAD exact match, SQuAD F1), 0-1."""
    from torchmetrics.functional.text.squad import squad

    em, f1 = [], []
    for i, (p, r) in enumerate(zip(predictions, references)):
        out = squad([{"prediction_text": p, "id": str(i)}],
                    [{"answers": {"answer_start": [0], "text": [r]}, "id": str(i)}])
        em.append(float(out["exact_match"]) / 100)
        f1.append(float(out["f1"]) / 100)
    return em, f1


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]


def compute(names: Sequence[str], predictions: Sequence[str], references: Sequence[str]) -> tuple[dict, dict]:
    """(corpus-level value per metric, per-item values per metric where the metric has them)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown generation metric {unknown[0]!r} (known: {', '.join(METRICS)})")
    per_item: dict[str, list[float]] = {}
    out: dict[str, float] = {}
    if not predictions:
        return {m: float("nan") for m in names}, {}
    if "exact_match" in names:
        per_item["exact_match"] = exact_match(predictions, references)
    if "squad_em" in names or "f1" in names:
        em, f1 = squad_scores(predictions, references)
        if "squad_em" in names:
            per_item["squad_em"] = em
        if "f1" in names:
            per_item["f1"] = f1
    if "rougeL" in names:
        per_item["rougeL"] = rouge_l(predictions, references)
    for m, vals in per_item.items():
        out[m] = sum(vals) / len(vals)
    if "bleu" in names or "chrf" in names:
        import sacrebleu

        if "bleu" in names:
            out["bleu"] = float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)
        if "chrf" in names:
            out["chrf"] = float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)
    return {m: out[m] for m in names}, per_item
