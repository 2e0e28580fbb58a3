"""Settings shared by the weight-pruning methods (magnitude, RD, oViT): targets, layers, schedule."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ScheduleConfig
from ..core.checks import check_int, check_names, check_sparsity
from ..errors import ConfigError

# The data-free layer allocations of hf_prune.sparse.allocation (names only, so configs stay torch-free).
ALLOCATIONS = ("global", "uniform", "lamp", "erk")


@dataclass
class WeightPruningConfig(ScheduleConfig):
    """Unstructured (individual-weight) pruning of Conv/Linear weights.

    ``sparsity``: fraction of the prunable weights to remove, [0, 1). ``nm=(2, 4)``: N:M sparsity inside
    every layer instead (``sparsity`` is then ``1 − n/m`` or omitted). Layers: ``layers`` (module names)
    or every Conv/Linear except the stem (``exclude_stem``), the classifier (``exclude_classifier``) and
    ``exclude`` (names or prefixes). During training, calibration data is the first ``calib_size``
    training items in batches of ``calib_batch_size`` unless ``calib=`` is passed to the callback.
    """

    sparsity: float | None = None
    nm: tuple | None = None
    layers: tuple | None = None
    exclude_stem: bool = True
    exclude_classifier: bool = True
    exclude: tuple = ()
    calib_size: int = 64
    calib_batch_size: int = 16

    def validate(self) -> None:
        if self.nm is not None:
            if len(self.nm) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in self.nm) \
                    or not 0 < self.nm[0] < self.nm[1]:
                raise ConfigError(f"nm={self.nm!r} must be two ints (n, m) with 0 < n < m, e.g. (2, 4)")
            implied = 1.0 - self.nm[0] / self.nm[1]
            if self.sparsity is None:
                self.sparsity = implied
            elif abs(self.sparsity - implied) > 1e-9:
                raise ConfigError(f"nm={self.nm} means sparsity {implied}, but sparsity={self.sparsity} was given")
        if self.sparsity is None:
            raise ConfigError("give sparsity= (the fraction of the prunable weights to remove, e.g. 0.5) or "
                              "nm=(2, 4); weight pruning does not reduce dense MACs, so target_macs does not apply")
        check_sparsity(self.sparsity)
        if self.layers is not None:
            self.layers = check_names("layers", self.layers)
        self.exclude = check_names("exclude", self.exclude)
        check_int("calib_size", self.calib_size)
        check_int("calib_batch_size", self.calib_batch_size)
        self.make_schedule("sparsity")
