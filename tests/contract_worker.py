"""One rank of ``test_contract.py::test_two_processes_end_identical`` (started by ``torch.distributed.run``).

For every registered method: a DDP ``Trainer`` run (gloo on CPU; each rank trains on its own shard of
every batch) with the method's callback, then a digest of the final model and the method record, written
to ``rank<k>.json`` in the directory given as argv[1].
"""
from __future__ import annotations

import json
import os
import sys
import warnings

import torch

torch.set_num_threads(1)


def main(out_dir: str) -> None:
    from accelerate import PartialState

    import test_contract as contract
    from distributed_worker import weights_hash
    from hf_prune.registry import list_methods

    state = PartialState(cpu=True)
    assert state.num_processes == 2 and torch.distributed.get_backend() == "gloo"
    data = contract.load_data()
    result = {}
    for method in list_methods():
        args = contract.targs(os.path.join(out_dir, method), steps=4, per_device_train_batch_size=8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, cb, _ = contract.train(method, "vit", os.path.join(out_dir, method), data, args=args)
        result[method] = {"weights": weights_hash(model), "record": cb.record}
    with open(os.path.join(out_dir, f"rank{state.process_index}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
