"""One-shot RD weight pruning of a small ViT trained on real digits, saved and loaded back.

RD measures each layer's output distortion on a calibration loader over a sparsity grid and
allocates the sparsity by dynamic programming; the smallest weights of each layer are zeroed. The
zeros are recorded in the saved structure spec (``config.hf_prune["sparsity"]``).

    python examples/rd_oneshot.py [--steps 300] [--sparsity 0.7] [--output-dir outputs/rd_oneshot]
"""
import argparse

import torch
from torch.utils.data import DataLoader, Subset
from transformers import ViTConfig, ViTForImageClassification

import hf_prune
from hf_prune.data import accuracy, load_digits, make_loader


def train(model, split, steps, lr=3e-3):
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    loader = make_loader(split, batch_size=32, shuffle=True)
    model.train()
    done = 0
    while done < steps:
        for batch in loader:
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    return model.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="dense training steps before pruning")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--calib-images", type=int, default=64)
    parser.add_argument("--output-dir", default="outputs/rd_oneshot")
    args = parser.parse_args(argv)

    train_split, val = load_digits(source="sklearn", image_size=16)
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=128, num_labels=10))
    train(model, train_split, args.steps)
    dense_acc = accuracy(model, val)

    calib = DataLoader(Subset(train_split, range(args.calib_images)), batch_size=32)
    hf_prune.prune(model, method="rd", sparsity=args.sparsity, calib=calib)
    pruned_acc = accuracy(model, val)
    stats = model.__dict__["hf_prune_record"]["stats"]

    hf_prune.save_pretrained(model, args.output_dir)
    reloaded = hf_prune.AutoPrunedModel.from_pretrained(args.output_dir).eval()
    x = val.pixel_values[:8]
    with torch.no_grad():
        assert torch.equal(model(x).logits, reloaded(x).logits), "the reloaded model differs"
    sparsity = reloaded.config.hf_prune["sparsity"]
    print(f"dense accuracy {dense_acc:.3f}; RD at {stats['global_sparsity']:.0%} of the prunable weights: "
          f"{pruned_acc:.3f} (no fine-tuning)")
    print(f"reloaded from {args.output_dir}: non-zero fraction of all weight matrices "
          f"{sparsity['global_nonzero']:.3f}, {len(sparsity['layers'])} sparse layers, e.g.")
    for entry in sparsity["layers"][:4]:
        print(f"  {entry['path']}.{entry['tensor']}: {entry['nonzero']:.3f} non-zero")
    return {"dense_acc": dense_acc, "pruned_acc": pruned_acc, "sparsity": stats["global_sparsity"],
            "spec_sparsity": sparsity}


if __name__ == "__main__":
    main()
