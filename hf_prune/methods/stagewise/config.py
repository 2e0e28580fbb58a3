"""Settings of SP: stage-wise width supernet training and search."""
from __future__ import annotations

from dataclasses import dataclass

from ...config import PruningConfig
from ...core.checks import check_choice, check_fraction, check_int, check_names, check_number, check_round_to
from ...errors import ConfigError

DEFAULT_RATIOS = tuple(0.25 + 0.125 * i for i in range(7))  # 0.25, 0.375, ..., 1.0
SUPERVISIONS = ("stage", "logits")
STAGE_SCHEDULES = ("parallel", "sequential")
IMPORTANCES = ("l2", "l1")
SEARCHES = ("stagewise", "chained")


@dataclass
class StageWiseConfig(PruningConfig):
    """SP (Zhang et al., arXiv 2011.04908): a weight-sharing width supernet trained stage by stage, each stage
    supervised by the unpruned full net, then searched under a MACs budget.

    ``target_macs``: the searched subnet's budget (fraction of dense MACs). Widths: ``ratios`` of every
    coupled group's units (leading units by ``importance``), rounded to ``round_to``; ``prune_stem`` /
    ``ignored_layers`` as for DepGraph. Training: ``num_random`` random subnets per step besides the largest
    and the smallest (sandwich rule); ``stages`` (``"auto"`` or module paths) / ``num_stages`` (chunks for
    models without resolution changes); ``supervision``: ``"stage"`` (each stage fed the full net's input,
    regressing its output) or ``"logits"`` (plain end-to-end KD, the baseline); ``stage_schedule``:
    ``"parallel"`` or ``"sequential"``; ``seed`` (the draw of step t depends only on seed and t);
    ``temperature``, ``stage_weight``, ``kd_weight``, ``ce_weight`` (loss). Search: ``search``:
    ``"stagewise"`` (default; each stage scored by its training loss against the full net on held-out
    data, ``stage_candidates`` width assignments per stage, stages combined by a DP under the budget,
    the ``final_candidates`` best combinations checked by chained accuracy; see
    :mod:`hf_prune.methods.stagewise.stage_search`) or ``"chained"`` (evolutionary search by end-to-end
    proxy accuracy: ``population``, ``generations``); ``calib_batches`` (held-out batches scoring and
    calibrating candidates), ``max_latency_ms`` (optional measured budget); ``search_at_end``: the
    callback searches and extracts the subnet when training ends (else call ``StageWiseTrainer.search``).
    ``reconstruct`` (one-shot ``prune(method="stagewise")``): re-fit the extracted subnet towards the full net
    on the calibration batches, as DepGraph does (:mod:`hf_prune.engine.reconstruct`); default True.
    """

    method = "stagewise"

    target_macs: float = 0.5
    ratios: tuple = DEFAULT_RATIOS
    round_to: int | None = 8
    importance: str = "l2"
    prune_stem: bool = False
    reconstruct: bool = True
    ignored_layers: tuple = ()
    num_random: int = 2
    stages: str | tuple = "auto"
    num_stages: int = 4
    supervision: str = "stage"
    stage_schedule: str = "parallel"
    seed: int = 0
    temperature: float = 1.0
    stage_weight: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    search: str = "stagewise"
    stage_candidates: int = 32
    final_candidates: int = 4
    population: int = 16
    generations: int = 4
    calib_batches: int = 8
    max_latency_ms: float | None = None
    search_at_end: bool = True

    def validate(self) -> None:
        check_fraction("target_macs", self.target_macs)
        if not self.ratios or any(not 0 < check_fraction("ratios", r) for r in self.ratios):
            raise ConfigError(f"ratios={self.ratios!r} must be a non-empty list of width ratios in (0, 1]")
        check_round_to(self.round_to)
        check_choice("importance", self.importance, IMPORTANCES)
        self.ignored_layers = check_names("ignored_layers", self.ignored_layers)
        check_int("num_random", self.num_random, minimum=0, meaning="random subnets per step besides the largest "
                                                                    "and the smallest")
        if self.stages != "auto" and (isinstance(self.stages, str) or not self.stages):
            raise ConfigError(f"stages={self.stages!r} is not understood: pass 'auto' or a list of module paths, one "
                              "per stage (e.g. ['stages.0', 'stages.1'])")
        check_int("num_stages", self.num_stages)
        check_choice("supervision", self.supervision, SUPERVISIONS)
        check_choice("stage_schedule", self.stage_schedule, STAGE_SCHEDULES)
        check_int("seed", self.seed, minimum=0)
        check_number("temperature", self.temperature, positive=True)
        for name in ("stage_weight", "kd_weight", "ce_weight"):
            check_number(name, getattr(self, name), minimum=0)
        check_choice("search", self.search, SEARCHES)
        check_int("stage_candidates", self.stage_candidates, meaning="width assignments scored per stage")
        check_int("final_candidates", self.final_candidates, meaning="best combinations checked by chained accuracy")
        check_int("population", self.population, minimum=2)
        check_int("generations", self.generations, minimum=0)
        check_int("calib_batches", self.calib_batches)
        if self.max_latency_ms is not None:
            check_number("max_latency_ms", self.max_latency_ms, positive=True)
