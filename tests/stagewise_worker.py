"""One rank of tests/test_stagewise.py's two-process run (``accelerate launch --multi_gpu --num_processes 2``).

Trains SP's width supernet with :class:`~hf_prune.methods.stagewise.callback.StageWiseTrainer` under DDP
(gloo on CPU) and writes ``rank<k>.json`` into argv[1]: the subnets drawn at every step, the labels of
this rank's first batch (to show the ranks see different data), a hash of the final weights, and the
searched subnet.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings

import torch

torch.set_num_threads(1)


def weights_hash(model) -> str:
    """Hash of the parameters (BN running statistics are per-rank between DDP's buffer broadcasts)."""
    h = hashlib.sha256()
    for name, t in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(out_dir: str) -> None:
    from accelerate import PartialState
    from transformers import ResNetConfig, ResNetForImageClassification, TrainerCallback, TrainingArguments

    from hf_prune.data import load_digits
    from hf_prune.methods.stagewise.callback import StageWiseCallback, StageWiseTrainer

    state = PartialState(cpu=True)
    rank = state.process_index
    train, val = load_digits(image_size=16, channels=3)
    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32],
                                                      depths=[1, 1, 1, 1], layer_type="basic", num_labels=10))
    cb = StageWiseCallback(target_macs=0.8, round_to=4, num_random=2, seed=7, search_at_end=False)
    draws = []

    class Recorder(TrainerCallback):  # runs after the SP callback at every step: sees its draw
        def on_step_begin(self, args, state, control, **kwargs):
            draws.append([state.global_step, [[tag, list(c)] for tag, c in cb.current]])

    args = TrainingArguments(output_dir=os.path.join(out_dir, "run"), use_cpu=True, seed=0, data_seed=0, report_to=[],
                             dataloader_num_workers=0, save_strategy="no", max_steps=4, per_device_train_batch_size=16,
                             learning_rate=1e-3, logging_steps=2, disable_tqdm=True, ddp_find_unused_parameters=False)
    trainer = StageWiseTrainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                               callbacks=[cb, Recorder()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
        subnet = trainer.search(population=4, generations=2, eval_batches=1, calib_batches=1)
    first = next(iter(trainer.get_train_dataloader()))["labels"][:8].tolist()
    result = {"rank": rank, "world_size": state.num_processes, "backend": torch.distributed.get_backend(),
              "wrapped": type(trainer.model_wrapped).__name__, "draws": draws, "history": cb.history,
              "first_labels": first, "weights": weights_hash(model), "searched": list(trainer.search_result.choice),
              "subnet_params": sum(p.numel() for p in subnet.parameters())}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    state.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
