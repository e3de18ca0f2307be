"""The tiny models load through the same from_pretrained calls as the hub repositories."""

from __future__ import annotations

import hashlib

from easyref.cli import main


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_layout_and_loading(tiny_models):
    from diffusers import StableDiffusionXLPipeline
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, Dinov2Model, Qwen2VLForConditionalGeneration

    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (tiny_models / "sdxl" / sub).is_dir(), sub
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models / "sdxl")
    assert pipe.unet.config.addition_embed_type == "text_time"
    mllm = Qwen2VLForConditionalGeneration.from_pretrained(tiny_models / "mllm")
    tok = AutoTokenizer.from_pretrained(tiny_models / "mllm")
    assert tok.convert_tokens_to_ids("<|image_pad|>") == mllm.config.image_token_id
    assert "Hello, wörld!" == tok.decode(tok("Hello, wörld!")["input_ids"])  # byte-level: any text round-trips
    assert (tiny_models / "mllm" / "chat_template.jinja").is_file()
    assert CLIPModel.from_pretrained(tiny_models / "clip").config.projection_dim == 32
    assert Dinov2Model.from_pretrained(tiny_models / "dino").config.hidden_size == 32
    assert AutoImageProcessor.from_pretrained(tiny_models / "dino", backend="pil") is not None
    size = sum(p.stat().st_size for p in tiny_models.rglob("*") if p.is_file())
    assert size < 20 * 2**20


def test_same_seed_same_bytes_and_rebuild_is_skipped(tmp_path, tiny_models, capsys):
    out = tmp_path / "again"
    assert main(["tiny-models", "--out", str(out), "--seed", "0"]) == 0
    assert _digest(out) == _digest(tiny_models)
    assert main(["tiny-models", "--out", str(out)]) == 0
    assert "already present" in capsys.readouterr().out
