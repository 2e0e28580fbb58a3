"""One-shot DepGraph pruning of a timm model to half its MACs, with a before/after profile.

    python examples/depgraph_oneshot.py [--model convnext_atto] [--image-size 224] [--target-macs 0.5]
"""
import argparse

import timm
import torch

import hf_prune


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnext_atto")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--target-macs", type=float, default=0.5)
    args = parser.parse_args(argv)

    model = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(1, 3, args.image_size, args.image_size)
    before = hf_prune.profile(model, x)
    hf_prune.prune(model, method="depgraph", target_macs=args.target_macs, example_inputs=x)
    after = hf_prune.profile(model, x)
    print(hf_prune.metrics.profiling.compare(before, after))
    return before, after


if __name__ == "__main__":
    main()
