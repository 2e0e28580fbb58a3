"""Gradual oViT pruning during fine-tuning with the transformers Trainer, on real digits from scikit-learn.

A small ViT trains while OViTCallback raises the sparsity on a cubic schedule (masks only grow; at
each pruning step the OBS weight update uses a block-wise empirical Fisher from calibration
gradients) and keeps fine-tuning at the final sparsity. The sparse model is saved with its
structure spec and loads back with hf_prune.AutoPrunedModel.

    python examples/ovit_callback.py [--max-steps 300] [--sparsity 0.75] [--output-dir outputs/ovit_callback]
"""
import argparse

import torch
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

import hf_prune
from hf_prune.data import accuracy, load_digits


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--sparsity", type=float, default=0.75)
    parser.add_argument("--num-grads", type=int, default=16, help="calibration gradients per pruning step")
    parser.add_argument("--output-dir", default="outputs/ovit_callback")
    args = parser.parse_args(argv)

    train, val = load_digits(source="sklearn", image_size=16)
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=128, num_labels=10))
    # fixed calibration mini-batches (the paper's setting; a list, so every pruning step sees the same ones)
    calib = [{"pixel_values": train.pixel_values[i:i + 16], "labels": train.labels[i:i + 16]}
             for i in range(0, 16 * args.num_grads, 16)]
    # the paper's recipe in miniature: cubic schedule from 40% to the target over the middle of training
    callback = hf_prune.OViTCallback(sparsity=args.sparsity, initial=0.4, schedule="cubic", start=0.2, end=0.7,
                                     frequency=max(1, args.max_steps // 10), calib=calib, num_grads=args.num_grads,
                                     block_size=32)
    training = TrainingArguments(output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=32,
                                 learning_rate=2e-3, use_cpu=True, report_to=[], save_strategy="no",
                                 logging_steps=max(1, args.max_steps // 5), seed=0)
    trainer = Trainer(model=model, args=training, train_dataset=train, callbacks=[callback])
    trainer.train()
    trainer.save_model(args.output_dir)

    reloaded = hf_prune.AutoPrunedModel.from_pretrained(args.output_dir).eval()
    x = {"pixel_values": val.pixel_values[:8]}
    with torch.no_grad():
        assert torch.equal(model.eval()(**x).logits, reloaded(**x).logits), "the reloaded model differs"
    acc = accuracy(reloaded, val)
    sparsity = callback.final_stats["sparsity"]
    steps = [e["step"] for e in callback.events]
    print(f"pruned at steps {steps} to {sparsity:.0%} of the prunable weights; validation accuracy {acc:.3f}")
    print(f"saved spec: non-zero fraction of all weight matrices "
          f"{reloaded.config.hf_prune['sparsity']['global_nonzero']:.3f}")
    return acc, sparsity


if __name__ == "__main__":
    main()
