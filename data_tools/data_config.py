"""The data config: one type for the training config's `data.*` section and the dataset builders."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    """The `data.*` section of the training config (pretrain/config.py) and what the dataset builders read
    (data_tools/datasets.py; the run's seed and the resolved data mode are passed beside it)."""
    # the tokenizer, as Megatron-LM names it (data_tools.tokenizer): type auto | SentencePieceTokenizer |
    # HuggingFaceTokenizer | GPT2BPETokenizer; model = .model file or tokenizer.json / its directory; vocab/merge
    # files for GPT-2 BPE; eod_id -1 = the tokenizer's default (eos; </d> for the project's own models). Empty
    # tokenizer fields are taken from the dataset's PREFIX.tokenizer.json written by preprocessing.
    tokenizer_model: str = ""
    tokenizer_type: str = "auto"
    vocab_file: str = ""
    merge_file: str = ""
    eod_id: int = -1
    data_path: list = field(default_factory=list)  # prefix, or weight prefix weight prefix ...
    split: str = "969,30,1"
    seq_length: int = 512
    mode: str = "auto"  # auto (the trainer: sclm with a text encoder, gpt without; the dataset tools: sclm) | sclm | gpt
    span_length: int = 128
    span_coverage: float = 0.25
    max_spans: int = 0  # 0: no cap (data_tools/objective.py SpanConfig)
    reset_position_ids: bool = False
    cache_dir: str = ""  # megatron-core's sample-index cache; "": RUN/index-cache in training, ~/.cache/metalm otherwise
    # vision-language (data_tools/image_text.py): image-text directories from `data_tools.images fetch`, as
    # [dir, ...] (weights = sizes) or [w1, dir1, w2, dir2, ...]; image_fraction = share of every micro-batch's rows
    # that are image-text (rounded to whole rows, at least 1; 1.0 = images only); image_task caption | vqa (the
    # answer after "question: what is this? answer:" from the class label), or a list of them, one per source
    image_path: list = field(default_factory=list)
    image_fraction: float = 0.5
    images_per_sample: int = 1
    image_task: list = field(default_factory=lambda: ["caption"])  # one task for all sources, or one per source
    workers: int = 0  # DataLoader worker processes building micro-batches (0: in the training process)
