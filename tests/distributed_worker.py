"""One rank of tests/test_distributed.py, started by ``accelerate launch --multi_gpu --num_processes 2``.

Writes ``rank<k>.json`` into the directory given as argv[1]:

* ``trainer``: a DDP ``Trainer`` run (gloo on CPU) with a ``DepGraphCallback`` pruning on a cubic
  schedule with Taylor importance; the final removed units (recorded before compaction), the
  pruning events and a hash of the final (compacted) weights.
* ``reduction``: the same model, *no* DDP, one backward pass on this rank's own data, then a pruning
  step driven through the callback's plain-loop API: the plan from this rank's local scores (which
  differ between ranks) and the masks actually installed (scores averaged with all_reduce, or rank
  0's broadcast), which must not.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings

import torch

torch.set_num_threads(1)


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(cfg)


def weights_hash(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(out_dir: str) -> None:
    from accelerate import PartialState
    from transformers import Trainer, TrainingArguments

    from hf_prune.methods.depgraph.callback import DepGraphCallback
    from hf_prune.data import load_digits

    state = PartialState(cpu=True)
    rank, world = state.process_index, state.num_processes
    train, _ = load_digits(image_size=16, channels=3)
    result = {"rank": rank, "world_size": world, "pid": os.getpid(), "distributed_type": str(state.distributed_type),
              "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None}

    # 1. Trainer + DDP: each rank gets its own shard of every batch.
    model = tiny_vit()
    cb = DepGraphCallback(target_macs=0.6, schedule="cubic", start=0.0, end=0.6, frequency=2, importance="taylor")
    args = TrainingArguments(output_dir=os.path.join(out_dir, "trainer"), use_cpu=True, seed=0, data_seed=0,
                             report_to=[], dataloader_num_workers=0, save_strategy="no", max_steps=8,
                             per_device_train_batch_size=16, learning_rate=2e-3, logging_steps=4, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    first_batch = next(iter(trainer.get_train_dataloader()))["labels"][:8].tolist()
    result["trainer"] = {"events": cb.events, "removed": cb.final_removed, "weights": weights_hash(model),
                         "first_labels": first_batch,
                         "num_params": sum(p.numel() for p in model.parameters())}

    # 2. Scores from different data on each rank: the reduction is what makes the masks agree.
    result["reduction"] = {}
    for sync in ("all_reduce", "broadcast"):
        model = tiny_vit()
        lo = 128 * rank
        x, y = train.pixel_values[lo:lo + 128], train.labels[lo:lo + 128]
        cb = DepGraphCallback(target_macs=0.6, schedule="oneshot", start=0, importance="taylor", sync=sync,
                              compact_at_end=False)
        cb.setup(model, total_steps=3, example_inputs={"pixel_values": x[:2]})
        assert not cb.step_begin(0)  # Taylor: no gradients yet, postponed
        model(pixel_values=x, labels=y).loss.backward()
        cb.pre_optimizer_step()  # no optimizer step: weights stay identical across ranks
        local_plan = cb.pruner.plan(target_macs=0.6, scores=cb.compute_scores())
        assert cb.step_begin(1)
        result["reduction"][sync] = {"local_plan": local_plan.tolist(), "removed": cb.removed_slices(),
                                     "removed_roots": cb.pruner.removed.tolist()}

    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    state.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
