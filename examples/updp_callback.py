"""UPDP in the transformers Trainer, all stages, on real digits shipped with scikit-learn.

1. train a depth supernet (every block original or pruned, one random subnet per step): UPDPSupernetCallback;
2. search the blocks to prune (evolutionary, proxy = held-out accuracy): hf_prune.methods.updp.search.search;
3. progressive training (activations anneal to identity, LN to BN) and exact merge: UPDPCallback(blocks=...).

    python examples/updp_callback.py [--supernet-steps 80] [--steps 80] [--num-blocks 2]
"""
import argparse

import torch
from transformers import ConvNextConfig, ConvNextForImageClassification, Trainer, TrainingArguments

import hf_prune
from hf_prune.data import accuracy, load_digits
from hf_prune.methods.updp.callback import UPDPCallback, UPDPSupernetCallback
from hf_prune.methods.updp.search import search


def train(model, data, steps, output_dir, callback):
    args = TrainingArguments(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=32,
                             learning_rate=3e-3, use_cpu=True, report_to=[], save_strategy="no",
                             logging_steps=max(1, steps // 4), seed=0)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--supernet-steps", type=int, default=80)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--num-blocks", type=int, default=2)
    parser.add_argument("--output-dir", default="outputs/updp_callback")
    args = parser.parse_args(argv)

    train_set, val = load_digits(source="sklearn", image_size=32)
    torch.manual_seed(0)
    model = ConvNextForImageClassification(ConvNextConfig(hidden_sizes=[16, 24, 32, 48], depths=[1, 1, 2, 1],
                                                          num_labels=10))
    supernet_cb = UPDPSupernetCallback()
    train(model, train_set, args.supernet_steps, args.output_dir, supernet_cb)

    held_out = {"pixel_values": val.pixel_values[:180], "labels": val.labels[:180]}
    result = search(supernet_cb.supernet, [held_out], num_blocks=args.num_blocks,
                    example_inputs={"pixel_values": train_set.pixel_values[:2]},
                    calib_data=[{"pixel_values": train_set.pixel_values[:256]}], population=8, generations=3)
    print(result.report(top=5))
    model = supernet_cb.supernet.restore()  # plain model again, supernet-trained weights

    updp_cb = UPDPCallback(blocks=result.blocks, anneal_end=0.6)
    train(model, train_set, args.steps, args.output_dir, updp_cb)
    hf_prune.save_pretrained(model, args.output_dir)
    reloaded = hf_prune.AutoPrunedModel.from_pretrained(args.output_dir).eval()
    x = val.pixel_values[:8]
    with torch.no_grad():
        assert torch.equal(model.eval()(x).logits, reloaded(x).logits)
    acc = accuracy(reloaded, val)
    merged = [e["path"] for e in updp_cb.annealer.merged]
    print(f"merged {merged}; validation accuracy {acc:.3f}")
    return acc, merged, result


if __name__ == "__main__":
    main()
