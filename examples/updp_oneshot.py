"""UPDP one-shot depth pruning: merge the blocks whose removal changes the output least.

    python examples/updp_oneshot.py [--model convnext_atto] [--num-blocks 2]
"""
import argparse

import timm
import torch

import hf_prune
from hf_prune.methods.updp.depth import find_blocks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnext_atto")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-blocks", type=int, default=2)
    args = parser.parse_args(argv)

    model = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(8, 3, args.image_size, args.image_size)  # a batch: it also calibrates the new BNs
    blocks_before = len(find_blocks(model))
    before = hf_prune.profile(model, x[:1])
    hf_prune.prune(model, method="updp", num_blocks=args.num_blocks, example_inputs=x)
    after = hf_prune.profile(model, x[:1])
    print(f"{blocks_before} candidate blocks; {args.num_blocks} merged")
    print(hf_prune.metrics.profiling.compare(before, after))
    return before, after


if __name__ == "__main__":
    main()
