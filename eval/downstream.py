"""In-loop downstream evaluation: zero/few-shot accuracy of the live model during pretraining (OLMo-style), so a run
shows when abilities appear.

Config (`logging.*`): `downstream_tasks` (names from data_tools.tasks), `downstream_shots` (e.g. [0, 4]),
`downstream_data` (the fetched task directory), `downstream_items` (the first N items of `downstream_split`: a fixed
subset, the same at every evaluation), scored at every `eval_interval` in the `causal` placement and, for a model
with a text encoder, the `encoder` placement too; demonstrations use seed 0.

Collective: every rank calls it. Items are split over data-parallel ranks and the counts all-reduced over the
data-parallel group (tensor-parallel ranks score the same rows together); under ZeRO-3 every rank scores every
item instead, because a forward gathers parameters collectively and every rank must run the same number of them.
Not available under pipeline parallelism (the stages hold different layers): refused at start-up.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from data_tools.task_samples import PLACEMENTS
from data_tools.tasks import get_task, load_split


class Downstream:
    def __init__(self, cfg, model, tok):
        lg = cfg.logging
        placements = [p for p in PLACEMENTS if p == "causal" or model.encoder is not None]
        self._setup(cfg, tok, lg.downstream_tasks, lg.downstream_data, lg.downstream_split, lg.downstream_items,
                    lg.downstream_shots, placements)

    @classmethod
    def for_tasks(cls, cfg, tok, tasks, data_dir: str, split: str, items: int, shots, placements) -> "Downstream":
        """A scorer of `tasks` (the first `items` items of `split`; 0 = all) in the given placements."""
        self = cls.__new__(cls)
        self._setup(cfg, tok, tasks, data_dir, split, items, shots, placements)
        return self

    def _setup(self, cfg, tok, tasks, data_dir, split, items, shots, placements):
        self.tasks = [get_task(t, data_dir=data_dir) for t in tasks]  # generative ones by greedy exact match
        self.shots = [int(k) for k in shots]
        self.placements = list(placements)
        self.items = {t.name: load_split(data_dir, t, split)[:items or None] for t in self.tasks}
        self.pools = {t.name: load_split(data_dir, t, t.fewshot_split) if max(self.shots) > 0 else []
                      for t in self.tasks}
        self.dec_limit = cfg.model.max_seq_length
        self.tok = tok

    def run(self, model, shard: bool) -> dict:
        from megatron.core import parallel_state

        from eval.score import score_items

        dp_rank = parallel_state.get_data_parallel_rank() if shard else 0
        dp = parallel_state.get_data_parallel_world_size() if shard else 1
        out = {}
        for task in self.tasks:
            mine = self.items[task.name][dp_rank::dp]
            for placement in self.placements:
                for k in self.shots:
                    if task.generative:
                        from eval.score import generate_items

                        gs = generate_items(model, self.tok, task, mine, self.pools[task.name], placement, k, 0,
                                            self.dec_limit, {"num_beams": 1})
                        from eval.gen_metrics import exact_match

                        em = exact_match(gs.predictions, gs.targets)
                        m, names = {"exact_match": sum(em) / len(em) if em else 0.0}, ("exact_match",)
                    else:
                        sc = score_items(model, self.tok, task, mine, self.pools[task.name], placement, k, 0,
                                         self.dec_limit, self.dec_limit)
                        m, names = sc.metrics(), ("acc", "acc_norm", "acc_mutual_info")
                    n = len(mine)
                    t = torch.tensor([m[x] * n if n else 0.0 for x in names] + [float(n)], dtype=torch.float64)
                    if dp > 1:
                        dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
                    key = f"down/{task.name}/{placement}/{k}shot"
                    for i, x in enumerate(names):
                        out[f"{key}/{x}"] = (t[i] / t[-1].clamp(min=1)).item()
        return out
