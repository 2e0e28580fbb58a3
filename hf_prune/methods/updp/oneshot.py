"""One-shot UPDP: choose blocks, anneal them to λ = 1 at once, recalibrate BatchNorm, merge exactly."""
from __future__ import annotations

from torch import nn

from .config import UPDPConfig
from .depth import prune_depth


def prune_updp(model: nn.Module, config: UPDPConfig, *, example_inputs=None, calib=None) -> dict:
    """Merge ``config``'s blocks of ``model`` in place; returns MACs and parameters before/after.

    ``example_inputs`` choose the blocks (by the output-change proxy) and calibrate the new BatchNorms.
    """
    before = sum(p.numel() for p in model.parameters())
    blocks = list(config.blocks) if config.blocks is not None else None
    _, record = prune_depth(model, example_inputs=example_inputs, blocks=blocks, num_blocks=config.num_blocks,
                            target_macs=config.target_macs, end_act=bool(config.end_act),
                            recalibrate=config.recalibrate)
    stats = {"params_before": before, "params_after": sum(p.numel() for p in model.parameters()),
             "merged_blocks": len(record["merged_blocks"])}
    if record.get("macs_before") is not None:
        stats.update(macs_before=record["macs_before"], macs_after=record["macs_after"])
    return stats
