"""Evaluate with lm-evaluation-harness, offline, on local tasks.

    python -m eval.lm_eval_bridge make-task --name moby_mc --data items.jsonl --out tasks/
    python -m eval.lm_eval_bridge run --model exported/metalm --tasks moby_mc --include-path tasks/ [--limit 100]

`--model` is a Hugging Face export (pretrain.convert export-hf) or a consolidated MetaLM directory, exported on the
fly. Tasks are local: a jsonl of multiple-choice items {"context": str, "choices": [str, ...], "label": int} turned
into an lm-eval task YAML with `dataset_path: json` (lm-eval's built-in tasks download their data, which the
machines here cannot). Runs with HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 so nothing is fetched.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from typing import Sequence

TASK_TEMPLATE = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: acc_mutual_info
"""


def make_task(name: str, data: str, out_dir: str) -> str:
    """Write OUT/NAME.yaml for a local multiple-choice jsonl; checks every item first."""
    with open(data) as f:
        for n, line in enumerate(f, 1):
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{data}:{n}: not JSON") from None
            if not (isinstance(item.get("context"), str) and isinstance(item.get("choices"), list)
                    and isinstance(item.get("label"), int) and 0 <= item["label"] < len(item["choices"])):
                raise ValueError(f"{data}:{n}: expected context (str), choices (list), label (int index)")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.yaml")
    with open(path, "w") as f:
        f.write(TASK_TEMPLATE.format(name=name, data=os.path.abspath(data)))
    return path


def as_hf_dir(model: str, scratch: str) -> str:
    if os.path.isfile(os.path.join(model, "config.json")):
        return model
    from pretrain.model_io import CONSOLIDATED, locate

    if locate(model)[0] == CONSOLIDATED:
        from pretrain.convert import export_hf

        return export_hf(model, os.path.join(scratch, "hf"))
    raise ValueError(f"{model}: neither a Hugging Face export (config.json) nor a consolidated MetaLM (metalm.json)")


@contextlib.contextmanager
def offline():
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE for the call only: the caller's environment is left as it was."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update({k: "1" for k in saved})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(model: str, tasks: Sequence[str], include_path: str, limit: int | None = None, batch_size: int = 8,
        log_samples: bool = False) -> dict:
    import torch

    with offline(), tempfile.TemporaryDirectory() as scratch:
        import lm_eval  # under the offline flags: the HF libraries read them when first imported
        from lm_eval.tasks import TaskManager

        hf_dir = as_hf_dir(model, scratch)
        return lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={hf_dir},dtype=float32", tasks=list(tasks),
            task_manager=TaskManager(include_path=include_path), limit=limit, batch_size=batch_size,
            device="cuda" if torch.cuda.is_available() else "cpu", log_samples=log_samples)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.lm_eval_bridge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-task", help="a local multiple-choice jsonl -> an lm-eval task YAML")
    m.add_argument("--name", required=True)
    m.add_argument("--data", required=True)
    m.add_argument("--out", required=True)
    r = sub.add_parser("run", help="evaluate a model on local tasks")
    r.add_argument("--model", required=True)
    r.add_argument("--tasks", nargs="+", required=True)
    r.add_argument("--include-path", required=True)
    r.add_argument("--limit", type=int)
    r.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    try:
        if args.cmd == "make-task":
            print(f"wrote {make_task(args.name, args.data, args.out)}")
            return 0
        results = run(args.model, args.tasks, args.include_path, args.limit, args.batch_size)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from lm_eval.utils import make_table

    print(make_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
