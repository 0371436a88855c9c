"""A stand-in for a text encoder the user left out (SD3's T5 with `model.drop_t5`).

StableDiffusion3Pipeline accepts text_encoder_3=None and then uses zeros for the T5 tokens. Training
keeps this module in the encoder's place so the family's prompt encoding runs unchanged and gives the
same zeros; pipelines built from the training modules get None again (`Models.components`).
"""

from __future__ import annotations

import torch


class DroppedEncoder(torch.nn.Module):
    """Zeros of the encoder's output width for every token; no weights, nothing to load or free."""

    dropped = True

    def __init__(self, width: int):
        super().__init__()
        self.width = int(width)
        self.register_buffer("anchor", torch.zeros(0), persistent=False)  # follows .to(device/dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def forward(self, input_ids: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor]:
        return (torch.zeros(*input_ids.shape[:2], self.width, device=self.anchor.device, dtype=self.anchor.dtype),)
