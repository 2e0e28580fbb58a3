"""SP (stage-wise channel pruning) with the transformers Trainer, on real digits shipped with scikit-learn.

A small ResNet is trained densely, then its width supernet is trained stage by stage (each stage
distilled from the full net, sandwich rule), the best subnet under half the MACs is searched by proxy
accuracy, fine-tuned, saved and reloaded with hf_prune.AutoPrunedModel.

    python examples/stagewise_callback.py [--dense-steps 150] [--max-steps 100] [--finetune-steps 100]
"""
import argparse

import torch
from transformers import ResNetConfig, ResNetForImageClassification, Trainer, TrainingArguments

import hf_prune
from hf_prune.data import accuracy, load_digits
from hf_prune.methods.stagewise.callback import StageWiseCallback, StageWiseTrainer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense-steps", type=int, default=150)
    parser.add_argument("--max-steps", type=int, default=100, help="supernet training steps")
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--target-macs", type=float, default=0.5)
    parser.add_argument("--output-dir", default="outputs/stagewise_callback")
    args = parser.parse_args(argv)

    def training(steps, lr):
        return TrainingArguments(output_dir=args.output_dir, max_steps=steps, per_device_train_batch_size=32,
                                 learning_rate=lr, use_cpu=True, report_to=[], save_strategy="no",
                                 per_device_eval_batch_size=128, logging_steps=max(1, steps // 4), seed=0,
                                 disable_tqdm=True)

    train, val = load_digits(source="sklearn", image_size=16)
    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 48, 64],
                                                      depths=[1, 1, 1, 1], layer_type="basic", num_labels=10))
    Trainer(model=model, args=training(args.dense_steps, 3e-3), train_dataset=train).train()  # the "pretrained" net

    callback = StageWiseCallback(target_macs=args.target_macs, round_to=4, population=8, generations=2)
    trainer = StageWiseTrainer(model=model, args=training(args.max_steps, 1e-3), train_dataset=train,
                               eval_dataset=val, callbacks=[callback])
    trainer.train()   # the width supernet, stage by stage; at the end the best subnet under the budget is kept
    subnet, found = model, callback.search_result
    print(f"searched subnet: {found.macs_ratio:.0%} of the MACs, proxy accuracy {found.score:.3f}")

    Trainer(model=subnet, args=training(args.finetune_steps, 1e-3), train_dataset=train).train()
    acc = accuracy(subnet, val)
    hf_prune.save_pretrained(subnet, args.output_dir, metrics={"accuracy": acc})
    reloaded = hf_prune.AutoPrunedModel.from_pretrained(args.output_dir).eval()
    x = {"pixel_values": val.pixel_values[:8]}
    with torch.no_grad():
        assert torch.equal(subnet.eval()(**x).logits, reloaded(**x).logits)
    print(f"fine-tuned subnet: validation accuracy {acc:.3f}; saved to {args.output_dir}")
    return acc, found.macs_ratio


if __name__ == "__main__":
    main()
