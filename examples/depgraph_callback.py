"""DepGraph during fine-tuning with the transformers Trainer, on real digits shipped with scikit-learn.

Masks grow on a cubic schedule; the model is physically smaller when training ends and loads back
with hf_prune.AutoPrunedModel.

    python examples/depgraph_callback.py [--max-steps 200] [--output-dir outputs/depgraph_callback]
"""
import argparse

import torch
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

import hf_prune
from hf_prune.data import accuracy, load_digits


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--output-dir", default="outputs/depgraph_callback")
    args = parser.parse_args(argv)

    train, val = load_digits(source="sklearn", image_size=16)
    model = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=64, num_hidden_layers=4,
                                                num_attention_heads=4, intermediate_size=128, num_labels=10))
    callback = hf_prune.DepGraphCallback(target_macs=0.5, schedule="cubic", start=0.1, end=0.6,
                                         frequency=10, compact_at_end=True)
    training = TrainingArguments(output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=32,
                                 learning_rate=2e-3, use_cpu=True, report_to=[], save_strategy="no",
                                 logging_steps=max(1, args.max_steps // 5), seed=0)
    trainer = Trainer(model=model, args=training, train_dataset=train, callbacks=[callback])
    trainer.train()
    trainer.save_model(args.output_dir)
    reloaded = hf_prune.AutoPrunedModel.from_pretrained(args.output_dir).eval()
    x = {"pixel_values": val.pixel_values[:8]}
    with torch.no_grad():
        assert torch.equal(model.eval()(**x).logits, reloaded(**x).logits)
    acc = accuracy(reloaded, val)
    ratio = callback.final_stats["macs_ratio"]
    print(f"pruned to {ratio:.0%} of the MACs; validation accuracy {acc:.3f}")
    return acc, ratio


if __name__ == "__main__":
    main()
