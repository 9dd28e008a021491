"""Evaluate with lm-evaluation-harness, offline, on local tasks: our own task files, or pre-rendered items.

    python -m eval.lm_eval_bridge export-task --task spam --data work/tasks --out lm_tasks/ [--template options]
    python -m eval.lm_eval_bridge make-task --name moby_mc --data items.jsonl --out tasks/
    python -m eval.lm_eval_bridge run --model exported/metalm --tasks spam_question --include-path lm_tasks/

`export-task` turns one of our tasks (a name, or a task file path; data_tools/task_files.py) into an lm-eval task
per template: the items of its few-shot and test splits as jsonl (fields, `choices`, `label` or `target`) and a YAML
whose `doc_to_text` is the template and its cue (the same Jinja: lm-eval renders it itself), `doc_to_choice:
"{{choices}}"`, `doc_to_target`, `fewshot_split`, and for a generative task `output_type: generate_until` with the
task's `until` / `max_gen_toks` (greedy). lm-eval then samples its own demonstrations from the train split.

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


def lm_eval_name(task, template_id: str) -> str:
    return f"{task.name}_{template_id}".replace(":", "_").replace("-", "_")


def export_task(spec: str, data_dir: str, out_dir: str, templates=None, test_split: str = "test",
                generation: dict | None = None) -> list[str]:
    """Our task -> one lm-eval task YAML per template (module docstring); returns the lm-eval task names."""
    import yaml

    from data_tools.tasks import get_task, load_split
    from eval.score import generation_settings, template_list

    base = get_task(spec)
    os.makedirs(out_dir, exist_ok=True)
    names = []
    for tid in template_list(base, templates):
        task = base.using(tid)
        name = lm_eval_name(base, tid)
        files = {}
        for split in dict.fromkeys([task.fewshot_split, test_split]):
            path = os.path.join(out_dir, f"{name}.{split}.jsonl")
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                for it in load_split(data_dir, base, split):
                    f.write(json.dumps({**it, "choices": task.choices(it)}, ensure_ascii=False) + "\n")
            os.replace(path + ".tmp", path)
            files[split] = os.path.abspath(path)
        text = task.template + (f" {task.cue}" if task.cue else "")
        cfg = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": files},
               "test_split": test_split, "fewshot_split": task.fewshot_split, "doc_to_text": text,
               "target_delimiter": " ", "fewshot_delimiter": "\n\n"}
        if task.generative:
            g = generation_settings(task, generation)
            if g["num_beams"] != 1:
                raise ValueError("export-task: lm-eval's generate_until here is greedy (num_beams 1)")
            cfg.update(output_type="generate_until", doc_to_target="{{target}}",
                       generation_kwargs={"until": list(g["until"]), "max_gen_toks": g["max_gen_toks"],
                                          "do_sample": False},
                       metric_list=[{"metric": "exact_match"}],
                       filter_list=[{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                                 {"function": "take_first"}]}])
        else:
            cfg.update(output_type="multiple_choice", doc_to_choice="{{choices}}", doc_to_target="{{label}}",
                       metric_list=[{"metric": m} for m in ("acc", "acc_norm", "acc_mutual_info")])
        path = os.path.join(out_dir, f"{name}.yaml")
        with open(path + ".tmp", "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False, allow_unicode=True)
        os.replace(path + ".tmp", path)
        names.append(name)
    return names


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
    x = sub.add_parser("export-task", help="one of our tasks (name or task file) -> lm-eval task YAMLs, one per "
                       "template")
    x.add_argument("--task", required=True)
    x.add_argument("--data", default="work/tasks", help="fetched task data (built-in tasks)")
    x.add_argument("--out", required=True)
    x.add_argument("--template", action="append", help="template id (repeatable; default: the first; all)")
    x.add_argument("--split", default="test")
    r = sub.add_parser("run", help="evaluate a model on local tasks")
    r.add_argument("--model", required=True)
    r.add_argument("--tasks", nargs="+", required=True)
    r.add_argument("--include-path", required=True)
    r.add_argument("--limit", type=int)
    r.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    from data_tools.cli import UserError

    try:
        if args.cmd == "make-task":
            print(f"wrote {make_task(args.name, args.data, args.out)}")
            return 0
        if args.cmd == "export-task":
            templates = "all" if args.template == ["all"] else args.template
            for name in export_task(args.task, args.data, args.out, templates, args.split):
                print(f"wrote {os.path.join(args.out, name + '.yaml')} (lm-eval task {name})")
            return 0
        results = run(args.model, args.tasks, args.include_path, args.limit, args.batch_size)
    except (ValueError, FileNotFoundError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from lm_eval.utils import make_table

    print(make_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
