"""Opt-in speed and memory options of the sampler (``EasyRefSampler.speed_up``, ``easyref generate`` flags).

Each leaves the maths unchanged except ``vae_tiling``; none is on by default because none wins everywhere (their
measured effect, side by side, is in docs/performance.md, from ``benchmarks/bench_sampler.py --savings``):

* ``fuse_qkv``: every self-attention (``attn1``) computes q, k and v with one matmul (diffusers'
  ``Attention.fuse_projections`` + ``FusedAttnProcessor2_0``). diffusers' own ``unet.fuse_qkv_projections()`` does
  not compose with EasyRef: it puts ``FusedAttnProcessor2_0`` on *every* attention, replacing the
  ``IPAdapterAttnProcessor2_0`` of each ``attn2`` and so silently dropping the reference branch. Here ``attn2``
  keeps its IP processor (unfused) and only ``attn1`` is fused. Refused with a LoRA (stages 2-3): the fused weight
  would be the base weight without the LoRA update.
* ``channels_last``: the UNet's convolution weights in NHWC memory layout.
* ``compile``: ``torch.compile`` of the UNet in place (the first call compiles: seconds on the tiny profile,
  minutes at real size; each new image size or batch compiles again).
* ``vae_slicing``: the VAE decodes one image at a time (less peak memory for many images; same maths).
* ``vae_tiling``: the VAE decodes outputs larger than its tile in overlapping tiles blended at the seams, so very
  large images fit in memory; the blending changes the pixels slightly near the seams.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from easyref.errors import UserError


@dataclass(kw_only=True)
class SpeedOptions:
    """Which of the sampler's opt-in speed and memory options to apply (see the module's docstring)."""

    fuse_qkv: bool = False
    channels_last: bool = False
    compile: bool = False
    vae_slicing: bool = False
    vae_tiling: bool = False

    def enabled(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name)]


def fuse_self_attention(unet: nn.Module) -> int:
    """Fuse q, k, v of every self-attention of ``unet`` into one projection; returns how many were fused.

    Cross-attention layers (the reference branch's ``IPAdapterAttnProcessor2_0``) are left as they are.
    """
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    if getattr(unet, "peft_config", None):
        raise UserError(
            "fuse_qkv cannot be used with a LoRA checkpoint (stages 2-3): the fused projection would hold the base "
            "weights without the LoRA update; leave fuse_qkv off"
        )
    fused = 0
    for module in unet.modules():
        if not isinstance(module, Attention) or module.is_cross_attention or hasattr(module, "to_qkv"):
            continue
        with torch.no_grad():
            module.fuse_projections(fuse=True)
        module.set_processor(FusedAttnProcessor2_0())
        fused += 1
    return fused


def apply_speed_options(unet: nn.Module, vae: nn.Module, options: SpeedOptions) -> None:
    """Apply ``options`` to a sampler's UNet and VAE, in place (they stay applied).

    It takes the two modules, not the sampler, so this module stays below :mod:`easyref.sampler` (no import circle).
    """
    if options.fuse_qkv:
        fuse_self_attention(unet)
    if options.channels_last:
        unet.to(memory_format=torch.channels_last)
    if options.vae_slicing:
        vae.enable_slicing()
    if options.vae_tiling:
        vae.enable_tiling()
    if options.compile:
        unet.compile()
