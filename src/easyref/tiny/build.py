"""Random tiny models of the real architectures, in the hub repositories' on-disk layouts.

The builders of :mod:`easyref.tiny_models` (which installs the pretrained parts over them) and the starting points
of every offline pretraining (:mod:`easyref.tiny`). Tokenizers are byte-level BPE vocabularies with no merges,
written to files: every byte is a token, so any text tokenises without a download. The same seed gives
byte-identical weights.
"""

from __future__ import annotations

from pathlib import Path

CLIP_IMAGE_SIZE = 64
"""Input side of the tiny CLIP towers (the judge and the IP-Adapter's image encoder)."""

# The instruction-following chat template of Qwen2-VL, reduced to what a user turn with images and text needs.
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

SDXL_TRAINED = ("vae", "unet", "text_encoder", "text_encoder_2")
"""The parts of the tiny SDXL that ``easyref pretrain-base`` trains (schedulers and tokenizers stay as written)."""


def _byte_alphabet() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    chars = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _clip_text_config(tokenizer):
    """The text tower of every tiny CLIP: the judges' and SDXL's two text encoders (SDXL's are CLIP text towers:
    OpenAI CLIP ViT-L/14's and OpenCLIP ViT-bigG/14's; the tiny base takes the tiny CLIPs' trained towers)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=64,
    )


def _seeded(seed: int, offset: int) -> None:
    import torch

    torch.manual_seed(seed * 1000 + offset)


def write_sdxl(path: Path, seed: int, width: int = 1) -> Path:
    """A random tiny SDXL folder (``StableDiffusionXLPipeline`` layout)."""
    from easyref.quiet import quiet_pil_fallback

    quiet_pil_fallback()  # before diffusers imports CLIPImageProcessor
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _clip_tokenizer()
    text_config = _clip_text_config(tokenizer)
    _seeded(seed, 1)
    unet = UNet2DConditionModel(
        sample_size=16,  # 16x16 latents = 64x64 pixels through the 4x VAE below
        in_channels=4,
        out_channels=4,
        block_out_channels=(32 * width, 64 * width),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2 * width, 4 * width),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        cross_attention_dim=128,  # = text_encoder + text_encoder_2 hidden sizes, as 768 + 1280 = 2048 in SDXL
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=112,  # 6 time ids x 8 + pooled text (64)
        norm_num_groups=8,
    )
    _seeded(seed, 2)
    # Three levels: a 4x downsampling VAE (SDXL's has four, 8x). `scaling_factor` is SDXL's until `easyref
    # pretrain-base` calibrates it on the trained VAE's latents, as Stable Diffusion did.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        sample_size=64,
        norm_num_groups=8,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    _seeded(seed, 3)
    text_encoder = CLIPTextModel(text_config)
    _seeded(seed, 4)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    # SDXL base 1.0's scheduler configuration.
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        use_karras_sigmas=False,
    )
    # Keys of SDXL base 1.0's scheduler_config.json that EulerDiscreteScheduler does not take but DDIMScheduler
    # reads through `from_config` (missing, DDIM would fall back to clip_sample=True and set_alpha_to_one=True).
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False, sample_max_value=1.0,
                                 skip_prk_steps=True, thresholding=False, dynamic_thresholding_ratio=0.995)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def write_qwen2vl(path: Path, seed: int, width: int = 1) -> None:
    from transformers import Qwen2Tokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vocab = {c: i for i, c in enumerate(_byte_alphabet())}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN2VL_SPECIAL_TOKENS[1:]),
        chat_template=QWEN2VL_CHAT_TEMPLATE,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN2VL_SPECIAL_TOKENS)})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2VL_SPECIAL_TOKENS}
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32 * width,
            intermediate_size=64 * width,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=8192,
            # head_dim 8 * width: 4 * width rotary pairs split over (t, h, w)
            rope_scaling={"type": "mrope", "mrope_section": [2 * width, width, width]},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=True,
            # hidden**-0.5 instead of the 2B model's 0.02: at width 32, 0.02 gives every projection a gain of ~0.1
            # and the group information fades before the reference tokens can read it
            initializer_range=(32 * width) ** -0.5,
        ),
        vision_config=dict(
            depth=3,
            embed_dim=64,  # a narrower or shallower tower tells the demo's colours and patterns but not its shapes
            hidden_size=32 * width,  # merger output = the language model's hidden size
            num_heads=4,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
            initializer_range=32**-0.5,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        tie_word_embeddings=True,
        initializer_range=(32 * width) ** -0.5,  # what `_init_weights` reads (the sub-configs say the same)
    )
    _seeded(seed, 5)
    model = Qwen2VLForConditionalGeneration(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    # Qwen2-VL-2B-Instruct's image-processor settings.
    Qwen2VLImageProcessorPil(
        min_pixels=56 * 56,
        max_pixels=28 * 28 * 1280,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    ).save_pretrained(path)


def _clip_vision_config():
    from transformers import CLIPVisionConfig

    # 64-px inputs in 8-px patches: enough to see the demo's shapes and patterns (a 30-px input blurs them)
    return CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_hidden_layers=3,
        image_size=CLIP_IMAGE_SIZE,
        patch_size=8,
        projection_dim=64,
    )


def _save_clip_image_processor(path: Path) -> None:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    side = CLIP_IMAGE_SIZE
    CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(path)


def write_clip(path: Path, seed: int) -> None:
    """A random CLIP (image and text towers, 64-d joint space) with its byte-level tokenizer and processor."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = _clip_tokenizer()
    text = _clip_text_config(tokenizer)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=_clip_vision_config().to_dict(), projection_dim=64)
    _seeded(seed, 6)
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    _save_clip_image_processor(path)


def write_dino(path: Path, seed: int) -> None:
    """A random DINOv2 (56-px crops in 8-px patches) with its image processor (resize 64, centre crop 56)."""
    from transformers import Dinov2Config, Dinov2Model
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    config = Dinov2Config(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=56,
        patch_size=8,
    )
    _seeded(seed, 7)
    Dinov2Model(config).save_pretrained(path)
    BitImageProcessorPil(
        size={"shortest_edge": 64},
        crop_size={"height": 56, "width": 56},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_convert_rgb=True,
    ).save_pretrained(path)


IP_ADAPTER_SUBFOLDER = "sdxl_models"
IP_ADAPTER_WEIGHTS = "ip-adapter_sdxl.safetensors"


def write_ip_adapter(path: Path, seed: int) -> None:
    """Random IP-Adapter-SDXL weights sized for the tiny SDXL written beside ``path``, plus a CLIP image encoder.

    The safetensors file holds ``image_proj.*`` (ImageProjection: Linear(image_embed, 4 x cross_attention_dim) +
    LayerNorm) and ``ip_adapter.{1,3,5,...}.to_{k,v}_ip.weight`` for each cross-attention layer in
    ``unet.attn_processors`` order, the layout diffusers' ``load_ip_adapter`` reads.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionModelWithProjection

    folder = path / IP_ADAPTER_SUBFOLDER
    unet = UNet2DConditionModel.from_pretrained(path.parent / "sdxl", subfolder="unet")
    cross_dim = unet.config.cross_attention_dim
    vision = _clip_vision_config()
    _seeded(seed, 8)
    CLIPVisionModelWithProjection(vision).save_pretrained(folder / "image_encoder")
    _save_clip_image_processor(folder / "image_encoder")
    _seeded(seed, 9)
    tokens = 4  # diffusers' ImageProjection for IP-Adapter (non-plus) always has 4 tokens
    tensors = {
        "image_proj.proj.weight": torch.randn(tokens * cross_dim, vision.projection_dim) * 0.05,
        "image_proj.proj.bias": torch.zeros(tokens * cross_dim),
        "image_proj.norm.weight": torch.ones(cross_dim),
        "image_proj.norm.bias": torch.zeros(cross_dim),
    }
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            attn = unet.get_submodule(name.removesuffix(".processor"))
            for proj in ("to_k", "to_v"):
                base = getattr(attn, proj).weight.detach()
                tensors[f"ip_adapter.{key_id}.{proj}_ip.weight"] = base + 0.02 * torch.randn_like(base)
            key_id += 2
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / IP_ADAPTER_WEIGHTS)
