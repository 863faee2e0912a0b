"""Exponential moving average of weights with a half-life measured in training images.

After ``nimg`` images the old average keeps weight 0.5 ** (nimg / ema_halflife_nimg)
(Karras et al. 2022, Appendix F.3 / EDM training code; Karras et al. 2024, §3.1). An optional
ramp-up limits the half-life to ``ema_rampup_ratio * images_seen`` early in training.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class EMA:
    """Float32 shadow copies of a module's parameters and buffers."""

    def __init__(self, module: nn.Module, ema_halflife_nimg: float, ema_rampup_ratio: Optional[float] = 0.05):
        if ema_halflife_nimg <= 0:
            raise ValueError(f"ema_halflife_nimg must be > 0, got {ema_halflife_nimg}")
        self.ema_halflife_nimg = float(ema_halflife_nimg)
        self.ema_rampup_ratio = ema_rampup_ratio
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    def beta(self, batch_nimg: int, cur_nimg: int) -> float:
        """Decay for one update after ``batch_nimg`` images, ``cur_nimg`` images seen in total."""
        halflife = self.ema_halflife_nimg
        if self.ema_rampup_ratio is not None:
            halflife = min(halflife, cur_nimg * self.ema_rampup_ratio)
        return 0.5 ** (batch_nimg / max(halflife, 1e-8))

    @torch.no_grad()
    def update(self, module: nn.Module, batch_nimg: int, cur_nimg: int) -> None:
        beta = self.beta(batch_nimg, cur_nimg)
        for k, v in module.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.detach().float(), 1 - beta)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state is missing {len(missing)} tensors, e.g. {sorted(missing)[0]!r}")
        self.shadow = {k: state[k].float().clone() for k in self.shadow}
