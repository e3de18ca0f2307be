"""The trainable model of a stage, built once: the base UNet and MLLM with the ``--init`` checkpoint's trained parts
(or fresh, seeded ones), LoRA attached when the stage trains it; and what the trainer may do to it before wrapping
it for DDP/FSDP: gradient checkpointing and ``torch.compile`` of the UNet."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from easyref.errors import UserError
from easyref.model import EasyRef, load_model
from easyref.train.config import TrainConfig


def build_model(config: TrainConfig, init: Path | None, sdxl: Path, mllm: Path) -> EasyRef:
    """Base models + the init checkpoint's trained parts (or fresh, seeded ones), LoRA added if the stage trains it."""
    torch.manual_seed(config.seed)
    model = load_model(sdxl, mllm, checkpoint=init, config=config.model)
    if "lora" in config.parts and not model.config.lora_rank:
        model.add_lora(config.lora_rank)
    return model


def enable_gradient_checkpointing(model: EasyRef) -> None:
    """Recompute UNet blocks and the (trainable) MLLM decoder layers in the backward pass."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.unet.enable_gradient_checkpointing()
    fn = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    for module in model.reference_encoder.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.gradient_checkpointing = True
            module._gradient_checkpointing_func = fn


def compile_unet(model: EasyRef, device: torch.device, backend: str = "inductor") -> None:
    """``torch.compile`` the UNet in place (``nn.Module.compile``: the module is not wrapped, so state-dict keys get
    no ``_orig_mod.`` prefix and checkpoints stay interchangeable with eager runs). On CPU, inductor needs a C++
    compiler; without one this refuses before training starts."""
    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise UserError(
            f"compile_backend: {backend!r} is not a torch.compile backend; choose from "
            f"{', '.join(torch._dynamo.list_backends())}"
        )
    if device.type == "cpu" and backend == "inductor":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as exc:
            raise UserError(
                f"compile_unet: torch.compile on CPU needs a C++ compiler (g++ or clang++; $CXX) and none works "
                f"here ({exc}); install one or set compile_unet: false"
            ) from None
    model.unet.compile(backend=backend)
