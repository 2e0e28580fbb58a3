"""Prune, push to the Hub (or save locally), and load back with one line.

    python examples/push_and_reload.py --repo me/resnet18-pruned      # needs a Hub token (HF_TOKEN)
    python examples/push_and_reload.py --local-dir outputs/resnet18-pruned
"""
import argparse

import timm
import torch

import hf_prune


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--repo", help="Hub repo id to push to")
    where.add_argument("--local-dir", help="save here instead of pushing")
    args = parser.parse_args(argv)

    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    hf_prune.prune(model, target_macs=0.5, example_inputs=x)
    if args.repo:
        hf_prune.push_to_hub(model, args.repo)
        source = args.repo
    else:
        hf_prune.save_pretrained(model, args.local_dir)
        source = args.local_dir
    reloaded = hf_prune.AutoPrunedModel.from_pretrained(source).eval()
    with torch.no_grad():
        same = torch.equal(model(x), reloaded(x))
    print(f"loaded back from {source}: identical outputs = {same}")
    return same


if __name__ == "__main__":
    main()
