"""Golden fixtures of the authors' released model: outputs and key listings kept outside this
repository, under $ASFF_REFERENCE (default: a shared/reference folder beside the checkout);
without them the tests that need them skip.

The fixtures hold no weights: they are regenerated from the released key listings by the
documented rule `asff-golden-v1`, which is re-implemented here from its description, and loaded
through head.load_released - so the golden tests check our key map and our model at once.
"""

import hashlib
import math
import os
import re
from functools import cache
from pathlib import Path

import pytest
import torch

from head import Detector, load_released

REFERENCE = Path(os.environ.get("ASFF_REFERENCE",
                                Path(__file__).resolve().parents[2] / "shared" / "reference"))
VARIANTS = {"baseline": dict(fusion=None), "asff": dict(fusion="asff"),
            "asff-rfb": dict(fusion="asff", rfb=True)}
LISTINGS = {"baseline": "official-state-dict-baseline.txt", "asff": "official-state-dict-asff.txt",
            "asff-rfb": "official-state-dict-asff-rfb.txt"}
RES_BRANCH = re.compile(r"^module_list\.(2|4|6|8|10)\.module_list\.\d+\.1\.conv\.weight$")

needs_golden = pytest.mark.skipif(not (REFERENCE / "golden").is_dir(),
                                  reason=f"golden fixtures not found under {REFERENCE}")
needs_listings = pytest.mark.skipif(not all((REFERENCE / f).is_file() for f in LISTINGS.values()),
                                    reason=f"released key listings not found under {REFERENCE}")


def read_listing(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    """[(key, shape)] from lines 'key (d0,d1,...)'; '()' is a 0-d tensor."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            key, dims = line.strip().rsplit(" ", 1)
            out.append((key, tuple(int(d) for d in dims[1:-1].split(",") if d)))
    return out


def _conv_gain(key: str, keys: set[str]) -> float:
    if key.endswith(".conv.weight") and key[:-6] + "bias" in keys:
        return 2.0                      # head output 1x1 conv
    if RES_BRANCH.match(key):
        return 0.5                      # 3x3 conv inside a backbone residual unit
    if key.endswith(".conv.weight"):
        return 1.5                      # other conv + BN blocks
    return 1.0                          # guide_wh, conv_offset, dconv, RFB, weight_levels


def golden_weights(listing: list[tuple[str, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """Rule asff-golden-v1: entry i draws from Generator().manual_seed(1000 + i), by leaf name."""
    keys = {k for k, _ in listing}
    weights = {}
    for i, (key, shape) in enumerate(listing):
        g = torch.Generator().manual_seed(1000 + i)
        leaf = key.rsplit(".", 1)[1]
        if leaf == "num_batches_tracked":
            t = torch.tensor(0, dtype=torch.int64)
        elif leaf == "running_mean":
            t = 0.1 * torch.randn(shape, generator=g)
        elif leaf == "running_var":
            t = 0.5 + torch.rand(shape, generator=g)
        elif leaf == "weight" and len(shape) == 1:
            t = 0.5 + 0.5 * torch.rand(shape, generator=g)
        elif leaf == "bias":
            t = 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = shape[1] * shape[2] * shape[3]
            t = torch.randn(shape, generator=g) * (_conv_gain(key, keys) / math.sqrt(fan_in))
        weights[key] = t
    return weights


@cache
def golden_reference(variant: str) -> dict:
    return torch.load(REFERENCE / "golden" / f"{variant}.pt", weights_only=True)


@cache
def _released_weights(variant: str) -> dict[str, torch.Tensor]:
    return golden_weights(read_listing(REFERENCE / LISTINGS[variant]))


def released_weights(variant: str) -> dict[str, torch.Tensor]:
    """The regenerated released state dict (fresh copies: loading must not share storage)."""
    return {k: v.clone() for k, v in _released_weights(variant).items()}


def weight_hashes(weights: dict[str, torch.Tensor]) -> list[str]:
    return [hashlib.sha256(t.numpy().tobytes()).hexdigest() for t in weights.values()]


def golden_model(variant: str) -> Detector:
    """Our Detector for the variant, 80 classes, loaded with the golden weights (eval mode)."""
    model = Detector(num_classes=80, **VARIANTS[variant])
    load_released(model, released_weights(variant), name=LISTINGS[variant])
    return model.eval()
