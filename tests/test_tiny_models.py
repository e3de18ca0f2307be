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
    assert CLIPModel.from_pretrained(tiny_models / "clip").config.projection_dim == 64
    assert Dinov2Model.from_pretrained(tiny_models / "dino").config.hidden_size == 64
    assert AutoImageProcessor.from_pretrained(tiny_models / "dino", backend="pil") is not None
    size = sum(p.stat().st_size for p in tiny_models.rglob("*") if p.is_file())
    assert size < 20 * 2**20


def test_same_seed_same_bytes_and_rebuild_is_skipped(tmp_path, tiny_models, capsys):
    out = tmp_path / "again"
    assert main(["tiny-models", "--out", str(out), "--seed", "0"]) == 0
    assert _digest(out) == _digest(tiny_models)
    assert main(["tiny-models", "--out", str(out)]) == 0
    assert "already present" in capsys.readouterr().out


def test_a_tree_written_before_a_part_was_re_made_is_rebuilt(tmp_path, tiny_models, capsys):
    """A tree whose stamp names another packaged MLLM (the part was re-made since) or another seed is not
    "already present": it is rebuilt, and says why."""
    import json
    import shutil

    out = tmp_path / "old"
    shutil.copytree(tiny_models, out)
    stamp = json.loads((out / ".complete").read_text())
    assert set(stamp["packaged"]) == {"sdxl", "mllm", "clip", "dino", "ip_adapter"}
    stamp["packaged"]["mllm"] = "0" * 64
    (out / ".complete").write_text(json.dumps(stamp))
    assert main(["tiny-models", "--out", str(out)]) == 0
    assert "other packaged mllm: rebuilding" in capsys.readouterr().out
    assert _digest(out) == _digest(tiny_models)
    assert main(["tiny-models", "--out", str(out), "--seed", "1"]) == 0
    assert "other seed: rebuilding" in capsys.readouterr().out


def test_tiny_mllm_tells_reference_groups_apart(tiny_models, tmp_path):
    """The untrained tiny Qwen2-VL's group states (reference tokens after the real insertion path) differ between
    demo groups by more than a tenth of their spread, and more than two halves of one group differ."""
    import torch
    from PIL import Image

    from easyref.data.demo import write_demo_data
    from easyref.model import ModelConfig, ReferenceProcessor, load_model

    write_demo_data(tmp_path, seed=0, min_images=4, max_images=4)
    # the demo's reference size (params.yaml train.model): 16-25 visual tokens per image
    config = ModelConfig(num_tokens=16, min_pixels=16 * 28 * 28, max_pixels=25 * 28 * 28, dropped_image_size=56)
    torch.manual_seed(0)
    model = load_model(tiny_models / "sdxl", tiny_models / "mllm", config=config)
    processor = ReferenceProcessor.from_pretrained(tiny_models / "mllm", config)
    groups = sorted(p for p in tmp_path.iterdir() if p.is_dir())[:16]
    halves = []
    with torch.no_grad():
        for group in groups:
            images = [Image.open(p) for p in sorted(group.glob("*.png"))]
            halves.append(model.reference_encoder(processor([images[:2], images[2:]], ["a shape", "a shape"])))
    states = torch.stack(halves)  # (groups, 2 halves, tokens, hidden)
    spread = states.std()
    same = (states[:, 0] - states[:, 1]).abs().mean() / spread
    other = (states[:, 0] - states.roll(1, dims=0)[:, 1]).abs().mean() / spread
    assert other > 0.1 and other > same, (float(other), float(same))
