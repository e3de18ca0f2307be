"""One training step of EasyRef traced on the meta device: parameters, FLOPs and saved activations per component.

Nothing is allocated or computed: the real-size model is built on ``meta`` (:mod:`easyref.architectures`) and a
step runs over meta tensors of the right shapes. ``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs of
every matmul, convolution and attention the step dispatches (forward, backward and any recomputation from gradient
checkpointing), and a ``saved_tensors_hooks`` pair adds up the bytes autograd keeps for the backward pass (tensors
that share storage with a parameter are not counted). The step follows the project's own code: the
:class:`~easyref.model.EasyRef` forward, its reference encoder's head (the trunk's output is fed in at the shape
the Qwen2-VL trunk produces), the stage's trainable parts and gradient checkpointing as the trainer sets them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from easyref.architectures import build_easyref, build_text_encoders, build_vae, count
from easyref.model import EasyRef, ModelConfig, adapter_processors

META = torch.device("meta")
TEXT_TOKENS = 60
"""Text tokens of the MLLM context around the images (chat template + instruction + a short caption)."""


@dataclass
class Component:
    """FLOPs per micro-batch and bytes saved for backward of one part of the step."""

    forward_flops: int = 0
    backward_flops: int = 0
    saved_bytes: int = 0


@dataclass
class StepTrace:
    """What :func:`trace_step` measured for one micro-batch."""

    params: dict[str, int]
    trainable: dict[str, int]
    components: dict[str, Component] = field(default_factory=dict)
    context_tokens: int = 0
    ip_layers: int = 0


class _SavedBytes:
    """Bytes of distinct storages autograd saves for backward, excluding parameters."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.seen, self.total = exclude, set(), 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.exclude and key not in self.seen:
            self.seen.add(key)
            self.total += storage.nbytes()
        return t


@contextlib.contextmanager
def _measure(component: Component, exclude: set[int], forward: bool = True) -> Iterator[None]:
    saved = _SavedBytes(exclude)
    with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        yield
    if forward:
        component.forward_flops += counter.get_total_flops()
        component.saved_bytes += saved.total
    else:
        component.backward_flops += counter.get_total_flops()


class _FlashAttention(torch.autograd.Function):
    """Stands in for SDPA on meta tensors with the memory and FLOPs of a fused (flash) kernel on a GPU.

    On ``meta`` PyTorch dispatches SDPA to its math path, which saves the whole attention matrix for backward; the
    CUDA kernels the real run uses save only the output and one log-sum-exp per query. This function saves exactly
    that, and runs the matmuls of the forward (2) and backward (5, with the recomputed scores) on meta tensors so
    the FLOP counter sees them.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = (q @ k.transpose(-1, -2)) @ v
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, _, _ = ctx.saved_tensors
        grad = grad.to(q.dtype)
        scores = q @ k.transpose(-1, -2)
        grad_v = scores.transpose(-1, -2) @ grad
        grad_scores = grad @ v.transpose(-1, -2)
        return grad_scores @ k, grad_scores.transpose(-1, -2) @ q, grad_v


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if key.shape[-3] != query.shape[-3]:  # grouped-query attention: each key/value head serves several query heads
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, dim=-3), value.repeat_interleave(repeat, dim=-3)
    if torch.bfloat16 in (query.dtype, key.dtype, value.dtype):  # autocast runs attention in bf16
        query, key, value = (t.to(torch.bfloat16) for t in (query, key, value))
    return _FlashAttention.apply(query, key, value)


class _Autocast(TorchFunctionMode):
    """bf16 autocast for meta tensors (``torch.autocast`` only acts on CPU and CUDA tensors).

    As CUDA autocast does: matmuls and convolutions cast floating inputs (weights included: the bf16 copy is what
    their backward keeps) to bf16; normalisations and softmax run in fp32.
    """

    LOW = {
        F.linear,
        F.conv1d,
        F.conv2d,
        F.conv3d,
        torch.matmul,
        torch.bmm,
        torch.baddbmm,
        torch.mm,
        torch.addmm,
        torch.Tensor.__matmul__,
        torch.Tensor.matmul,
    }
    FP32 = {F.layer_norm, F.group_norm, F.softmax, F.log_softmax}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = torch.bfloat16 if func in self.LOW else torch.float32 if func in self.FP32 else None
        if dtype is not None:

            def cast(a):
                return a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a

            args = tuple(cast(a) for a in args)
            kwargs = {k: cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _recompute_under_autocast(model: nn.Module) -> None:
    """Checkpointed blocks recompute in the backward pass, where :class:`_Autocast` is not active: enter it there."""
    import functools

    from torch.utils.checkpoint import checkpoint

    def contexts():
        return contextlib.nullcontext(), _Autocast()

    fn = functools.partial(checkpoint, use_reentrant=False, context_fn=contexts)
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = fn


def _vision_inputs(references: int, ref_side: int) -> tuple[torch.Tensor, int]:
    """``grid_thw`` of ``references`` square images of side ``ref_side`` (multiple of 28) and the patch count."""
    grid = ref_side // 14
    thw = torch.tensor([[1, grid, grid]] * references)
    return thw, references * grid * grid


def _trunk(
    model: EasyRef,
    thw: torch.Tensor,
    patches: int,
    batch: int,
    trained: bool,
    exclude: set[int],
    comp: Component,
    extra_tokens: int = 0,
    text_tokens: int = TEXT_TOKENS,
) -> torch.Tensor:
    """Vision tower + embeddings + the decoder layers before the insertion layer over the whole context."""
    from transformers.models.qwen2_vl import modeling_qwen2_vl as q

    core = model.reference_encoder.mllm
    visual, lm = core.visual, core.language_model
    position_ids = q.get_vision_position_ids(thw, visual.spatial_merge_size, kwargs={})
    cu_seqlens, max_seqlen = q.get_vision_attention_seqlens(thw, visual.config, kwargs={})
    grad = torch.enable_grad() if trained else torch.no_grad()
    with grad, _measure(comp, exclude):
        pixels = torch.randn(batch * patches, visual.patch_embed.proj.weight[0].numel(), device=META)
        hidden = visual.patch_embed(pixels)
        rotary = visual.rotary_pos_emb(hidden, position_ids.repeat(batch, 1).to(META))
        seqlens = torch.cat([cu_seqlens[:1]] + [cu_seqlens[1:] + i * patches for i in range(batch)])
        for block in visual.blocks:
            hidden = block(
                hidden, cu_seqlens=seqlens.to(torch.int32), max_seqlen=max_seqlen, position_embeddings=rotary
            )
        image_tokens = visual.merger(hidden).reshape(batch, -1, lm.config.hidden_size)
        text = lm.embed_tokens(torch.zeros(batch, text_tokens + extra_tokens, dtype=torch.long, device=META))
        embeds = torch.cat([image_tokens, text], dim=1)
        length = embeds.shape[1]
        positions = torch.arange(length, device=META)[None, None].expand(3, batch, length)
        out = lm(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state
    return out


def trace_step(
    root: Path,
    parts: list[str],
    lora_rank: int,
    batch: int,
    resolution: int,
    references: int = 2,
    ref_side: int = 336,
    num_tokens: int = 64,
    gradient_checkpointing: bool = False,
    tokens_at_layer0: bool = False,
    param_dtype: torch.dtype | None = None,
    text_tokens: int | None = None,
) -> StepTrace:
    """Trace one micro-batch of ``batch`` samples with ``references`` images each, target ``resolution``^2 px.

    ``tokens_at_layer0`` traces the alternative the paper's efficient aggregation avoids: the reference tokens
    enter at the MLLM's input and the whole MLLM trains (the context is then ``num_tokens`` longer in every layer).
    ``param_dtype`` is the dtype every weight is held in (bf16 weights are used by autocast as they are, float32
    ones leave bf16 copies saved for backward, which are counted); ``None``: as the config files build (float32,
    and the dtypes some of them name). ``text_tokens``: the MLLM context's
    text tokens beside the visual ones (default :data:`TEXT_TOKENS`).
    """
    text_tokens = TEXT_TOKENS if text_tokens is None else text_tokens
    config = ModelConfig(num_tokens=num_tokens, lora_rank=lora_rank if "lora" in parts else 0)
    model = build_easyref(root, config, dtype=param_dtype)
    model.set_trainable(parts)
    if gradient_checkpointing:
        from easyref.train.build import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
        _recompute_under_autocast(model)
    if "lora" in parts and param_dtype is not None:
        model.to(param_dtype)  # peft creates the LoRA weights in float32
    frozen = (build_vae(root, dtype=param_dtype), *build_text_encoders(root, dtype=param_dtype))
    with mock.patch("torch.nn.functional.scaled_dot_product_attention", _sdpa):
        return _trace(
            model, frozen, parts, batch, resolution, references, ref_side, num_tokens, tokens_at_layer0, text_tokens
        )


def _trace(
    model: EasyRef,
    frozen: tuple,
    parts: list[str],
    batch: int,
    resolution: int,
    references: int,
    ref_side: int,
    num_tokens: int,
    tokens_at_layer0: bool,
    text_tokens: int,
) -> StepTrace:
    vae, text_encoder, text_encoder_2 = frozen
    trace = StepTrace(params={}, trainable={}, ip_layers=len(adapter_processors(model.unet)))
    trace.params, trace.trainable = part_counts(model, vae, (text_encoder, text_encoder_2))
    exclude = {p.untyped_storage()._cdata for p in model.parameters()}
    comps = {name: Component() for name in ("vae", "text_encoders", "mllm_trunk", "mllm_head", "unet")}
    trace.components = comps

    latent = resolution // 8
    with torch.no_grad(), _measure(comps["vae"], exclude):
        vae.encode(torch.randn(batch, 3, resolution, resolution, device=META, dtype=vae.dtype))
    with torch.no_grad(), _measure(comps["text_encoders"], exclude):
        ids = torch.zeros(batch, 77, dtype=torch.long, device=META)
        text_encoder(ids, output_hidden_states=True)
        text_encoder_2(ids, output_hidden_states=True)

    trunk_trained = "mllm" in parts or tokens_at_layer0
    thw, patches = _vision_inputs(references, ref_side)
    encoder = model.reference_encoder
    with _Autocast():
        context = _trunk(
            model,
            thw,
            patches,
            batch,
            trunk_trained,
            exclude,
            comps["mllm_trunk"],
            num_tokens if tokens_at_layer0 else 0,
            text_tokens,
        )
        trace.context_tokens = context.shape[1]
        context_leaf = context.detach().requires_grad_(trunk_trained)
        length = context.shape[1]
        positions = torch.arange(length, device=META)[None, None].expand(3, batch, length)
        encoder.trunk = lambda inputs: (context_leaf, positions)  # the head runs the project's own code
        encoder.freeze_trunk = not trunk_trained
        # an all-ones padding mask: transformers itself skips the mask (SDPA is_causal); reading it needs values
        no_mask = mock.patch("transformers.masking_utils.create_causal_mask", lambda **kwargs: None)
        with torch.enable_grad(), no_mask, _measure(comps["mllm_head"], exclude):
            states = encoder({"attention_mask": torch.ones(batch, length, dtype=torch.long)})
        states_leaf = states.detach().requires_grad_(True)
        with torch.enable_grad(), _measure(comps["unet"], exclude):
            eps = model(
                torch.randn(batch, 4, latent, latent, device=META),
                torch.zeros(batch, dtype=torch.long, device=META),
                torch.randn(batch, 77, model.unet.config.cross_attention_dim, device=META),
                torch.randn(
                    batch,
                    model.unet.add_embedding.linear_1.in_features - 6 * model.unet.config.addition_time_embed_dim,
                    device=META,
                ),
                torch.randn(batch, 6, device=META),
                states_leaf,
            )
            loss = eps.float().pow(2).mean()
    with _measure(comps["unet"], exclude, forward=False):
        loss.backward()
    with _measure(comps["mllm_head"], exclude, forward=False):
        states.backward(states_leaf.grad)
    if trunk_trained:
        with _measure(comps["mllm_trunk"], exclude, forward=False):
            context.backward(context_leaf.grad)
    return trace


PLAN_PARTS = ("unet", "lora", "ip_kv", "projector", "mllm_head", "mllm_trunk")


def plan_part(key: str) -> str:
    """Which of :data:`PLAN_PARTS` an :class:`EasyRef` parameter name belongs to."""
    part = EasyRef.part_of(key)
    if part == "lora":
        return "lora"
    if part == "adapter":
        return "projector" if key.startswith("unet.encoder_hid_proj.") else "ip_kv"
    if part == "reference":
        return "mllm_head"
    return "mllm_trunk" if key.startswith("reference_encoder.") else "unet"


def part_counts(model: EasyRef, vae: nn.Module, text_encoders: tuple[nn.Module, ...]) -> tuple[dict, dict]:
    """Parameters ``(total, trainable)`` per part: the UNet's base weights, its LoRA, the IP-Adapter k/v, the
    projector, the MLLM head (insertion layer and after, with the tokens) and trunk, the VAE and the text encoders."""
    groups: dict[str, list] = {name: [] for name in PLAN_PARTS}
    for key, p in model.named_parameters():
        groups[plan_part(key)].append(p)
    params = {name: count(ps) for name, ps in groups.items()}
    trainable = {name: count(p for p in ps if p.requires_grad) for name, ps in groups.items()}
    params["vae"] = count(vae.parameters())
    params["text_encoders"] = sum(count(m.parameters()) for m in text_encoders)
    trainable["vae"] = trainable["text_encoders"] = 0
    return params, trainable
