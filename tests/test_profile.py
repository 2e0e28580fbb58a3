"""hf_prune.metrics.profiling: exact MAC counts, parameter counts, latency, mode restoration, reports."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hf_prune.metrics.profiling import ProfileReport, compare, count_macs, profile, time_model


def test_linear_macs_and_params_exact():
    model = nn.Linear(64, 32)
    report = profile(model, torch.randn(5, 64), warmup=1, iters=3)
    assert report.macs == 5 * 64 * 32
    assert report.params == 64 * 32 + 32
    assert report.nonzero_params <= report.params
    assert report.batch_size == 5
    assert report.device == "cpu"
    assert report.latency_ms is not None and report.latency_ms > 0


def test_conv_macs_exact():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1, bias=False))
    report = profile(model, torch.randn(2, 3, 16, 16), measure_latency=False)
    conv1 = 2 * 8 * 16 * 16 * (3 * 3 * 3)
    conv2 = 2 * 4 * 16 * 16 * 8
    assert report.macs == conv1 + conv2
    assert report.params == 8 * 3 * 9 + 8 + 4 * 8
    assert report.latency_ms is None


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(6, 4)

    def forward(self, x, y):
        return self.a(x) + self.b(y)


def test_positional_tuple_inputs():
    report = profile(_TwoInputs(), (torch.randn(3, 8), torch.randn(3, 6)), measure_latency=False)
    assert report.macs == 3 * 8 * 4 + 3 * 6 * 4
    assert report.batch_size == 3


def _tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
    )
    torch.manual_seed(0)
    return ViTForImageClassification(config)


def test_transformers_vit_dict_inputs_counts_attention():
    model = _tiny_vit()
    batch, tokens, dim, heads, mlp = 2, (32 // 8) ** 2 + 1, 64, 4, 128
    report = profile(model, {"pixel_values": torch.randn(batch, 3, 32, 32)}, warmup=1, iters=2)

    patch_embed = (tokens - 1) * dim * (3 * 8 * 8)
    per_layer = (
        tokens * dim * 3 * dim  # q, k, v projections
        + 2 * heads * tokens * tokens * (dim // heads)  # Q K^T and A V (scaled_dot_product_attention)
        + tokens * dim * dim  # output projection
        + 2 * tokens * dim * mlp  # MLP
    )
    classifier = dim * 10  # on the [CLS] token only
    assert report.macs == batch * (patch_embed + 2 * per_layer + classifier)
    assert report.params == sum(p.numel() for p in model.parameters())
    assert report.batch_size == batch
    assert report.latency_ms > 0


def test_multihead_attention_fast_path_is_counted():
    # nn.MultiheadAttention's fused inference path would count as 0 MACs if not disabled
    mha = nn.MultiheadAttention(64, 4, batch_first=True)
    x = torch.randn(2, 17, 64)
    expected = 2 * (4 * 17 * 64 * 64 + 2 * 4 * 17 * 17 * 16)
    assert count_macs(mha, (x, x, x)) == expected
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_training_mode_restored():
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.BatchNorm1d(8))
    model.train()
    profile(model, torch.randn(4, 8), warmup=1, iters=2)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    profile(model, torch.randn(4, 8), warmup=1, iters=2)
    assert not any(m.training for m in model.modules())


def test_nonzero_params_counts_sparsity():
    model = nn.Linear(10, 10, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.weight[:, :5] = 0.0
    report = profile(model, torch.randn(1, 10), measure_latency=False)
    assert report.params == 100
    assert report.nonzero_params == 50
    assert report.sparsity == pytest.approx(0.5)
    assert "sparse" in str(report)


def test_time_model_returns_iters_positive_timings():
    model = nn.Linear(16, 16).eval()
    timings = time_model(model, torch.randn(2, 16), warmup=2, iters=7)
    assert len(timings) == 7
    assert all(t > 0 for t in timings)


def test_report_str_dict_and_compare():
    before = ProfileReport(
        params=22_050_000, nonzero_params=22_050_000, macs=4_610_000_000,
        latency_ms=12.3, batch_size=1, device="cpu",
    )
    after = ProfileReport(
        params=11_000_000, nonzero_params=11_000_000, macs=2_305_000_000,
        latency_ms=8.2, batch_size=1, device="cpu",
    )
    text = str(before)
    assert "22.05 M" in text and "4.61 G" in text and "12.3 ms" in text
    assert "batch 1, cpu" in text
    assert before.to_dict() == {
        "params": 22_050_000, "nonzero_params": 22_050_000, "macs": 4_610_000_000,
        "latency_ms": 12.3, "batch_size": 1, "device": "cpu",
    }
    table = compare(before, after)
    assert "before" in table and "after" in table
    assert "1.50x speed-up" in table  # 12.3 / 8.2
    assert "0.50x" in table  # MACs after/before

    no_latency = ProfileReport(**{**after.to_dict(), "latency_ms": None})
    assert "n/a" in compare(before, no_latency)


def test_model_returning_output_object():
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, pixel_values):
            return SimpleNamespace(logits=self.fc(pixel_values))

    model = Wrapped()
    report = profile(model, {"pixel_values": torch.randn(3, 4)}, warmup=0, iters=5)
    assert report.macs == 3 * 4 * 2
    assert report.latency_ms > 0


def test_package_level_profile_is_the_function():
    import hf_prune
    import hf_prune.metrics.profiling  # noqa: F401  (importing the module must not shadow the function)

    model = nn.Linear(4, 3)
    report = hf_prune.profile(model, torch.randn(2, 4), measure_latency=False)
    assert isinstance(report, ProfileReport) and report.macs == 2 * 4 * 3
