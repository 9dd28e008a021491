"""Tasks defined in files: a small YAML (or JSON) file per task, lm-evaluation-harness' conventions where they fit.

    task: my_sentiment                       # the name reports use (required)
    description: product reviews, good / bad
    dataset:                                 # where the items are; one of:
      data_files: {train: train.jsonl, validation: dev.jsonl, test: test.parquet}  # relative to this file
      # data_files: all.jsonl + split_fractions: [0.8, 0.1, 0.1]   (one file, split by a seeded permutation)
      # source: spam | bbh:navigate | bigbench:TASK                  (a built-in source: `data_tools.tasks fetch`)
    output_type: multiple_choice             # or generate_until (a free target string, scored by generation)
    doc_to_text: "Review: {{review}}"        # Jinja over the item's fields (lm-eval's syntax)
    cue: "Sentiment:"                        # decoder text after the input (ours; lm-eval puts it in doc_to_text)
    doc_to_choice: ["bad", "good"]           # a list, a field name, or Jinja giving a list ("{{options}}")
    doc_to_target: label                     # a field name or Jinja: an index, or one of the choices / the target
    templates:                               # optional, instead of doc_to_text / cue: several prompt formats
      - {id: plain, doc_to_text: "{{review}}", cue: "It was"}
      - {id: options, doc_to_text: "{{review}} OPTIONS: </s> {{choices | join(' </s> ')}} </s>", cue: "TARGET:"}
    fewshot_split: train                     # where demonstrations come from (default train)
    generation_kwargs: {until: ["\\n"], max_gen_toks: 32, num_beams: 1, length_penalty: 0.6}
    metric_list: [acc, acc_norm]             # or [{metric: exact_match}, ...]; defaults by output type
    metadata: {cluster: sentiment, keywords: [...]}   # clusters group tasks for instruction tuning

lm-eval task YAMLs over local files (`dataset_path: json|parquet`, `dataset_kwargs: {data_files: ...}`,
`training_split` / `validation_split` / `test_split`) are read too, where their templates are plain Jinja (no
`!function`). `</s>` in a template is the end-of-sentence token itself. Inside a template, `choices` is the item's
answer choices. A malformed file is one `UserError` naming the file and the field.

Why a loader of our own: lm-eval's `TaskConfig` needs its `datasets`-backed task classes and a registry of Python
functions; the scorer and the finetuning rows need only the template, the choices and the target of each item.
Jinja is jinja2 itself (what lm-eval uses), with undefined fields an error instead of an empty string.
"""
from __future__ import annotations

import ast
import functools
import json
import os
import re
from dataclasses import dataclass, field, replace

import numpy as np

from data_tools.cli import UserError

SPLITS = ("train", "validation", "test")
SEED = 1234
OUTPUT_TYPES = ("multiple_choice", "generate_until")
MC_METRICS = ("acc", "acc_norm", "acc_mutual_info")
GEN_METRICS = ("exact_match", "squad_em", "f1", "rougeL", "bleu", "chrf")  # eval/gen_metrics.py
GENERATION_KEYS = {"until": list, "max_gen_toks": int, "num_beams": int, "length_penalty": (int, float),
                   "do_sample": bool, "temperature": (int, float)}
TASK_FILE_SUFFIXES = (".yaml", ".yml", ".json")
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Template:
    id: str
    text: str  # Jinja over the item's fields: the task input (the encoder's, under the `encoder` placement)
    cue: str = ""  # decoder-side text after the input
    answers: tuple[str, ...] = ()  # this template's verbaliser, when it has its own


@dataclass(frozen=True)
class Task:
    name: str
    source: str  # a built-in fetcher (data_tools.tasks.FETCHERS), or "files" for a task whose file names its data
    templates: tuple[Template, ...]
    answers: tuple[str, ...] = ()  # verbaliser: label index -> answer text; () = the item's own `choices`
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    description: str = ""
    generative: bool = False  # a free `target` string per item instead of choices + label
    fewshot_split: str = "train"
    generation: dict = field(default_factory=dict, hash=False, compare=False)  # generation_kwargs
    metadata: dict = field(default_factory=dict, hash=False, compare=False)  # cluster, keywords, family...
    path: str = ""  # the task file
    data: dict = field(default_factory=dict, hash=False, compare=False)  # files / split_fractions / fields
    template_index: int = 0  # the template in use (`using`)

    # ------------------------------------------------------------ the template in use
    @property
    def template(self) -> str:
        return self.templates[self.template_index].text

    @property
    def cue(self) -> str:
        return self.templates[self.template_index].cue

    @property
    def template_id(self) -> str:
        return self.templates[self.template_index].id

    @property
    def optional(self) -> bool:
        """Its source is not a registry package (BIG-bench, BBH): it may be unreachable on a given machine."""
        return self.source.startswith(("bigbench:", "bbh:"))

    @property
    def cluster(self) -> str:
        return str(self.metadata.get("cluster", self.name))

    def template_ids(self) -> list[str]:
        return [t.id for t in self.templates]

    def using(self, template: str | int) -> "Task":
        """This task with another of its templates in use (by id or index)."""
        ids = self.template_ids()
        if isinstance(template, int) or (isinstance(template, str) and template.isdigit() and template not in ids):
            i = int(template)
            if not 0 <= i < len(ids):
                raise UserError(f"task {self.name}: no template {i} (it has {len(ids)}: {', '.join(ids)})")
            return replace(self, template_index=i)
        if template not in ids:
            raise UserError(f"task {self.name}: no template {template!r} (it has: {', '.join(ids)})")
        return replace(self, template_index=ids.index(template))

    def choices(self, item: dict) -> list[str]:
        if self.generative:
            return [item["target"]]
        answers = self.templates[self.template_index].answers or self.answers
        return list(answers) if answers else list(item["choices"])

    def answer(self, item: dict) -> str:
        """The right answer's text: the target of a generative item, the labelled choice otherwise."""
        return item["target"] if self.generative else self.choices(item)[item["label"]]

    def render(self, item: dict) -> str:
        return render(self.template, {**item, "choices": self.choices(item)}, self,
                      f"template {self.template_id!r}")


# ====================================================================== Jinja
@functools.lru_cache(maxsize=None)
def _env():
    import jinja2

    return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)


@functools.lru_cache(maxsize=4096)
def compile_template(text: str):
    return _env().from_string(text)


def render(text: str, item: dict, task: Task | None = None, what: str = "template") -> str:
    import jinja2

    try:
        return compile_template(text).render(**item)
    except jinja2.UndefinedError as e:
        name = task.name if task else "?"
        raise UserError(f"task {name}: item {item.get('id')!r} has no field for {what} ({e.message}; "
                        f"{text!r})") from None
    except jinja2.TemplateError as e:
        raise UserError(f"task {task.name if task else '?'}: {what} {text!r}: {e}") from None


# ====================================================================== parsing a task file
def is_task_file(spec: str) -> bool:
    return spec.endswith(TASK_FILE_SUFFIXES) or os.sep in spec or os.path.isfile(spec)


def read_task_file(path: str) -> Task:
    """A task file -> Task (every field checked; one UserError naming the file and the field)."""
    if not os.path.isfile(path):
        raise UserError(f"task file not found: {path}")
    path = os.path.abspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.endswith(".json"):
            spec = json.loads(text)
        else:
            import yaml

            spec = yaml.safe_load(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a JSON task file ({e})") from None
    except Exception as e:  # yaml.YAMLError, a `!function` tag, ...
        raise UserError(f"{path}: not a YAML task file ({str(e).splitlines()[0]})") from None
    return task_from_spec(spec, path)


def _bad(path: str, key: str, expected: str, got=None) -> UserError:
    shown = "" if got is None else f", got {got!r}"[:200]
    return UserError(f"{path}: field '{key}': expected {expected}{shown}")


def _str(spec: dict, key: str, path: str, default: str | None = None, required: bool = False) -> str | None:
    v = spec.get(key, default)
    if v is None and required:
        raise _bad(path, key, "a string (required)")
    if v is not None and not isinstance(v, str):
        raise _bad(path, key, "a string", v)
    return v


def _check_jinja(text: str, path: str, key: str) -> None:
    import jinja2

    try:
        compile_template(text)
    except jinja2.TemplateSyntaxError as e:
        raise _bad(path, key, f"a Jinja template ({e.message})", text) from None


def _choices_spec(v, path: str, key: str):
    """doc_to_choice: a literal list (the task's verbaliser), a field name, or a Jinja string giving a list."""
    if isinstance(v, list):
        if not v or not all(isinstance(c, (str, int, float)) for c in v):
            raise _bad(path, key, "a non-empty list of answer strings", v)
        return tuple(str(c) for c in v)
    if isinstance(v, str) and v.strip():
        if not _FIELD.match(v):
            _check_jinja(v, path, key)
        return v
    raise _bad(path, key, "a list of answers, a field name or a Jinja string", v)


def _templates(spec: dict, path: str) -> tuple[Template, ...]:
    if "templates" in spec:
        ts = spec["templates"]
        if not isinstance(ts, list) or not ts:
            raise _bad(path, "templates", "a non-empty list of {id, doc_to_text, cue}", ts)
        out = []
        for i, t in enumerate(ts):
            key = f"templates[{i}]"
            if not isinstance(t, dict):
                raise _bad(path, key, "a mapping with doc_to_text (and id, cue)", t)
            unknown = set(t) - {"id", "doc_to_text", "cue", "doc_to_choice"}
            if unknown:
                raise _bad(path, f"{key}.{sorted(unknown)[0]}", "one of id, doc_to_text, cue, doc_to_choice")
            text = t.get("doc_to_text")
            if not isinstance(text, str):
                raise _bad(path, f"{key}.doc_to_text", "a string (required)", text)
            if not isinstance(t.get("cue", ""), str):
                raise _bad(path, f"{key}.cue", "a string", t["cue"])
            tid = str(t.get("id", i))
            answers = _choices_spec(t["doc_to_choice"], path, f"{key}.doc_to_choice") if "doc_to_choice" in t else ()
            if isinstance(answers, str):
                raise _bad(path, f"{key}.doc_to_choice", "a literal list (a template's own verbaliser)", answers)
            _check_jinja(_field_or_jinja(text), path, f"{key}.doc_to_text")
            out.append(Template(tid, _field_or_jinja(text), t.get("cue", ""), answers))
        ids = [t.id for t in out]
        if len(set(ids)) != len(ids):
            raise _bad(path, "templates", "distinct template ids", ids)
        return tuple(out)
    text = _str(spec, "doc_to_text", path, required=True)
    _check_jinja(_field_or_jinja(text), path, "doc_to_text")
    return (Template("0", _field_or_jinja(text), _str(spec, "cue", path, "")),)


def _field_or_jinja(text: str) -> str:
    """lm-eval: a doc_to_text that is a bare field name means that field."""
    return "{{" + text + "}}" if _FIELD.match(text) else text


def _metrics(spec: dict, path: str, generative: bool) -> tuple[str, ...]:
    known = GEN_METRICS if generative else MC_METRICS
    v = spec.get("metric_list")
    if v is None:
        return ("exact_match",) if generative else ("acc", "acc_norm")
    if not isinstance(v, list) or not v:
        raise _bad(path, "metric_list", "a non-empty list of metric names or {metric: NAME}", v)
    out = []
    for i, m in enumerate(v):
        name = m.get("metric") if isinstance(m, dict) else m
        if name not in known:
            raise _bad(path, f"metric_list[{i}]", f"one of {', '.join(known)} for a "
                       f"{'generate_until' if generative else 'multiple_choice'} task", name)
        out.append(name)
    return tuple(out)


def _generation(spec: dict, path: str) -> dict:
    g = spec.get("generation_kwargs") or {}
    if not isinstance(g, dict):
        raise _bad(path, "generation_kwargs", "a mapping", g)
    for k, v in g.items():
        if k not in GENERATION_KEYS:
            raise _bad(path, f"generation_kwargs.{k}", f"one of {', '.join(GENERATION_KEYS)}")
        if k == "until" and isinstance(v, str):
            g = {**g, "until": [v]}
            continue
        if not isinstance(v, GENERATION_KEYS[k]) or (k == "until" and not all(isinstance(s, str) for s in v)):
            raise _bad(path, f"generation_kwargs.{k}", "a list of stop strings" if k == "until" else
                       f"a {GENERATION_KEYS[k]}", v)
    return dict(g)


def _dataset(spec: dict, path: str) -> tuple[str, dict]:
    """(source, data): a built-in source, or this file's own data files."""
    base = os.path.dirname(path)
    ds = spec.get("dataset")
    if ds is None and spec.get("dataset_path") in ("json", "parquet"):  # lm-eval's local-files form
        kw = spec.get("dataset_kwargs") or {}
        files = kw.get("data_files") if isinstance(kw, dict) else None
        if files is None:
            raise _bad(path, "dataset_kwargs.data_files", "the data files of dataset_path "
                       f"{spec['dataset_path']!r}")
        names = {s: spec.get(f"{k}_split") for s, k in (("train", "training"), ("validation", "validation"),
                                                         ("test", "test"))}
        if isinstance(files, dict):  # lm-eval names splits by data_files keys, mapped by *_split fields
            by_key = {}
            for split, key in names.items():
                if key is not None:
                    if key not in files:
                        raise _bad(path, f"{'training' if split == 'train' else split}_split",
                                   f"one of the data_files keys {sorted(files)}", key)
                    by_key[split] = files[key]
            files = by_key or files
        ds = {"data_files": files}
    if ds is None:
        raise _bad(path, "dataset", "a mapping with data_files (or source), or lm-eval's dataset_path: json + "
                   "dataset_kwargs.data_files")
    if not isinstance(ds, dict):
        raise _bad(path, "dataset", "a mapping with data_files or source", ds)
    if "source" in ds:
        if not isinstance(ds["source"], str):
            raise _bad(path, "dataset.source", "the name of a built-in source", ds["source"])
        return ds["source"], {}
    files = ds.get("data_files")
    if isinstance(files, str):
        files = {"all": files}
    if not isinstance(files, dict) or not files or not all(isinstance(v, str) for v in files.values()):
        raise _bad(path, "dataset.data_files", "a file or a mapping split -> file (train / validation / test)",
                   files)
    for k in files:
        if k not in SPLITS + ("all",):
            raise _bad(path, f"dataset.data_files.{k}", "a split name: train, validation or test")
    resolved = {k: v if os.path.isabs(v) else os.path.normpath(os.path.join(base, v)) for k, v in files.items()}
    for k, v in resolved.items():
        if not os.path.isfile(v):
            raise _bad(path, f"dataset.data_files.{k}", "an existing jsonl / json / parquet file", v)
        if not v.endswith((".jsonl", ".json", ".parquet")):
            raise _bad(path, f"dataset.data_files.{k}", "a .jsonl, .json or .parquet file", v)
    data = {"files": resolved}
    if "all" in resolved:
        if len(resolved) > 1:
            raise _bad(path, "dataset.data_files", "either one file (split by split_fractions) or files per split")
        fr = ds.get("split_fractions", [0.8, 0.1, 0.1])
        if not (isinstance(fr, list) and len(fr) == 3 and all(isinstance(x, (int, float)) and x >= 0 for x in fr)
                and abs(sum(fr) - 1) < 1e-6):
            raise _bad(path, "dataset.split_fractions", "three fractions (train, validation, test) summing to 1", fr)
        data["split_fractions"] = [float(x) for x in fr]
        data["seed"] = int(ds.get("seed", SEED))
    return "files", data


KNOWN_KEYS = {"task", "description", "dataset", "dataset_path", "dataset_kwargs", "training_split",
              "validation_split", "test_split", "fewshot_split", "output_type", "doc_to_text", "cue", "doc_to_choice",
              "doc_to_target", "templates", "generation_kwargs", "metric_list", "metadata", "target_delimiter",
              "fewshot_delimiter", "num_fewshot", "tag", "group"}


def task_from_spec(spec, path: str) -> Task:
    if not isinstance(spec, dict):
        raise UserError(f"{path}: expected a mapping of task fields (task, dataset, doc_to_text, ...)")
    unknown = sorted(set(spec) - KNOWN_KEYS)
    if unknown:
        raise _bad(path, unknown[0], f"a known task field ({', '.join(sorted(KNOWN_KEYS))})")
    name = _str(spec, "task", path, required=True)
    if not re.match(r"^[A-Za-z0-9_.:-]+$", name):
        raise _bad(path, "task", "a name of letters, digits and _ . : -", name)
    out_type = _str(spec, "output_type", path, "multiple_choice")
    if out_type not in OUTPUT_TYPES:
        raise _bad(path, "output_type", " or ".join(OUTPUT_TYPES), out_type)
    generative = out_type == "generate_until"
    for k in ("target_delimiter", "fewshot_delimiter"):
        default = " " if k == "target_delimiter" else "\n\n"
        if spec.get(k, default) != default:
            raise _bad(path, k, f"{default!r} (the only delimiter the scorer uses)", spec[k])
    source, data = _dataset(spec, path)
    answers = ()
    if generative:
        if "doc_to_choice" in spec:
            raise _bad(path, "doc_to_choice", "nothing for a generate_until task (its target is free text)")
    else:
        if "doc_to_choice" not in spec:
            raise _bad(path, "doc_to_choice", "the answer choices of a multiple_choice task")
        c = _choices_spec(spec["doc_to_choice"], path, "doc_to_choice")
        answers = c if isinstance(c, tuple) else ()
        if isinstance(c, str):
            data["choices"] = c
    target = spec.get("doc_to_target", "target" if generative else "label")
    if not isinstance(target, (str, int)) or (isinstance(target, str) and not target.strip()):
        raise _bad(path, "doc_to_target", "a field name or a Jinja string", target)
    if isinstance(target, str) and not _FIELD.match(target):
        _check_jinja(target, path, "doc_to_target")
    data["target"] = target
    fewshot = _str(spec, "fewshot_split", path, "train")
    if fewshot not in SPLITS:
        raise _bad(path, "fewshot_split", "train, validation or test", fewshot)
    meta = spec.get("metadata") or {}
    if not isinstance(meta, dict):
        raise _bad(path, "metadata", "a mapping (cluster, keywords, ...)", meta)
    return Task(name=name, source=source, templates=_templates(spec, path), answers=answers,
                metrics=_metrics(spec, path, generative), description=_str(spec, "description", path, "") or "",
                generative=generative, fewshot_split=fewshot, generation=_generation(spec, path), metadata=meta,
                path=path, data=data)


# ====================================================================== a file task's items
def _read_rows(path: str) -> list[tuple[int, dict]]:
    """(line or row number, record) of a jsonl / json (list, or {"examples": [...]}) / parquet file."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return list(enumerate(pq.read_table(path).to_pylist(), 1))
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: not JSON ({e})") from None
            data = data.get("examples", data) if isinstance(data, dict) else data
            if not isinstance(data, list):
                raise UserError(f"{path}: expected a list of records (or {{\"examples\": [...]}})")
            return list(enumerate(data, 1))
        rows = []
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError:
                raise UserError(f"{path}:{n}: not JSON") from None
        return rows


def _value(spec, row: dict, where: str, task: Task, key: str):
    """A field name's value, or a rendered Jinja string (lm-eval: a string that looks like a list is one)."""
    if isinstance(spec, int):
        return spec
    if _FIELD.match(spec):
        if spec not in row:
            raise UserError(f"{where}: field {spec!r} missing (task {task.name}'s {key})")
        return row[spec]
    text = render(spec, row, task, key)
    if text.strip().startswith("["):
        try:
            return ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            pass
    return text


def normalise(task: Task, row, where: str, default_id: str) -> dict:
    """One data record -> a task item: its own fields plus `id`, and `choices` + `label` (multiple choice) or
    `target` (generative)."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    item = dict(row)
    item["id"] = str(row.get("id", default_id))
    if "choices" in task.data:
        choices = _value(task.data["choices"], row, where, task, "doc_to_choice")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: doc_to_choice gave {choices!r}, expected a non-empty list of answers")
        item["choices"] = [str(c) for c in choices]
    target = _value(task.data["target"], row, where, task, "doc_to_target")
    if task.generative:
        if isinstance(target, list):  # lm-eval allows several references; the first is the target
            target = target[0] if target else ""
        item["target"] = str(target)
        item.pop("label", None)
        return item
    answers = task.answers or item.get("choices")
    if isinstance(target, str) and target.strip().lstrip("-").isdigit():
        target = int(target)
    if isinstance(target, bool) or not isinstance(target, (int, str)):
        raise UserError(f"{where}: doc_to_target gave {target!r}, expected an index or one of the choices")
    if isinstance(target, str):
        if target not in answers:
            raise UserError(f"{where}: doc_to_target gave {target!r}, not one of the choices {list(answers)}")
        target = list(answers).index(target)
    if not 0 <= target < len(answers):
        raise UserError(f"{where}: doc_to_target gave index {target}, the item has {len(answers)} choices")
    item["label"] = int(target)
    return item


@functools.lru_cache(maxsize=64)
def _file_splits(task: Task, mtimes: tuple) -> dict[str, list[dict]]:
    files = task.data["files"]
    out = {}
    for split, path in files.items():
        out[split] = [normalise(task, row, f"{path}:{n}", f"{split}/{n}") for n, row in _read_rows(path)]
    if "all" in out:
        items = out.pop("all")
        fr = task.data["split_fractions"]
        perm = np.random.default_rng(task.data["seed"]).permutation(len(items))
        n_train, n_val = int(round(len(items) * fr[0])), int(round(len(items) * fr[1]))
        cuts = {"train": perm[:n_train], "validation": perm[n_train:n_train + n_val], "test": perm[n_train + n_val:]}
        out = {s: [items[i] for i in idx.tolist()] for s, idx in cuts.items()}
    return out


def file_split(task: Task, split: str) -> list[dict]:
    """The items of one split of a task whose file names its data (cached while the files are unchanged)."""
    files = task.data["files"]
    if split not in files and "all" not in files:
        raise UserError(f"{task.path}: field 'dataset.data_files.{split}': task {task.name} has no {split} split "
                        f"(it has {', '.join(files)})")
    mtimes = tuple((p, os.path.getmtime(p)) for p in files.values())
    key = replace(task, template_index=0)
    return [dict(it) for it in _file_splits(key, mtimes)[split]]
