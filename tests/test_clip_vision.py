"""Tests for the CLIP vision tower (minidiff/models/clip.py CLIPVisionModel) and loading.load_clip_vision.

Fast: output shapes and count, no projection -> image_embeds None, the OpenAI `visual.*` rename table on a
model-made state dict (and as a file with text-tower keys beside it), one-line CheckpointErrors for a
truncated, a non-checkpoint, a non-CLIP file, a folder without weights and a TorchScript archive.
Parity (@pytest.mark.parity, needs transformers 4.x), fp32, random weights:
  - tiny configs in the transformers layouts: a CLIPModel folder (pytorch_model.bin + config.json, its text
    tower ignored, heads from config.json) and a bare CLIPVisionModel file (no config.json, no projection).
  - FULL ViT-L/14 (Diff-Plugin's encoder) saved by transformers (CLIPVisionModelWithProjection,
    model.safetensors): every hidden state (index 24 reported), pooled and projected embeddings.
  - FULL ViT-B/32 (clean-fid's CLIP-FID encoder) written in the OpenAI layout by this file's own HF->OpenAI
    writer, conv/linear/proj in float16 as in ViT-B-32.pt, text tower keys beside it; and in the HF layout.
Run: cd /work/main && python -m pytest tests/test_clip_vision.py -q -s     (seconds; the two FULL-size
parity tests are marked slow: add --runslow, about 20 s more on 2 CPU cores)
"""
import re
from dataclasses import replace

import pytest
import torch

from helpers import assert_close
from minidiff.models.clip import (CLIP_VISION_B32, CLIP_VISION_L14, TINY_CLIP_VISION, TINY_CLIP_VISION_B32,
                           CLIPVisionModel)
from minidiff.io.loading import load_clip_vision
from minidiff.io.weights import CheckpointError, clip_vision_from_openai
from test_clip_text import hf_model, randomize_


def hf_to_openai(sd, half=True):
    """HF CLIP vision state dict -> OpenAI's `visual.*` names, written here apart from minidiff's table.
    OpenAI fuses q/k/v into in_proj_*, stores the projection transposed and (clip/model.py convert_weights)
    keeps conv, linear (weight and bias) and proj in float16, LayerNorms and embeddings in float32."""
    out = {}
    for key, t in sd.items():
        if key == "visual_projection.weight":
            out["visual.proj"] = t.t().contiguous().half() if half else t.t().contiguous()
            continue
        if re.search(r"self_attn\.[kv]_proj", key) or key.endswith("position_ids"):
            continue  # fused with q_proj below
        m = re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if m:
            i, mod, kind = m.groups()
            if mod == "self_attn.q_proj":
                qkv = [sd[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
                name, t = f"attn.in_proj_{kind}", torch.cat(qkv)
            else:
                name = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                        "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}[mod] + f".{kind}"
            new = f"visual.transformer.resblocks.{i}.{name}"
        else:
            new = "visual." + {"vision_model.embeddings.patch_embedding.weight": "conv1.weight",
                               "vision_model.embeddings.class_embedding": "class_embedding",
                               "vision_model.embeddings.position_embedding.weight": "positional_embedding",
                               "vision_model.pre_layrnorm.weight": "ln_pre.weight",
                               "vision_model.pre_layrnorm.bias": "ln_pre.bias",
                               "vision_model.post_layernorm.weight": "ln_post.weight",
                               "vision_model.post_layernorm.bias": "ln_post.bias"}[key]
        is_16 = half and (new.endswith("conv1.weight") or re.search(r"(in_proj_|out_proj|c_fc|c_proj)", new))
        out[new] = t.half() if is_16 else t
    return out


def fp16_round_(hf_model):
    """Round the tensors that OpenAI stores in float16 (conv, linear weights and biases, projection)."""
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" not in name and not name.endswith(("class_embedding", "position_embedding.weight")):
                p.copy_(p.half().float())
    return hf_model


def hf_config(cfg, transformers):
    return transformers.CLIPVisionConfig(hidden_size=cfg.width, intermediate_size=cfg.mlp,
                                         num_attention_heads=cfg.heads, num_hidden_layers=cfg.layers,
                                         patch_size=cfg.patch_size, image_size=cfg.image_size,
                                         projection_dim=cfg.projection or 512)


def compare(model, ref, pixels, label):
    """minidiff vs a transformers vision model (with or without projection) on the same pixels."""
    inner = []  # the pooled output of transformers' inner vision transformer, from the same forward call
    hook = ref.vision_model.register_forward_hook(lambda module, args, output: inner.append(output))
    with torch.no_grad():
        out = model(pixels)
        exp = ref(pixel_values=pixels, output_hidden_states=True)
    hook.remove()
    assert len(out.hidden_states) == len(exp.hidden_states)
    # fp32, the same operations in the same order: ~1e-6 expected; 1e-4 relative is the project-wide bound.
    for k in range(len(out.hidden_states) - 1):
        assert_close(out.hidden_states[k], exp.hidden_states[k], 1e-4, f"{label} h{k}")
    last = len(out.hidden_states) - 1
    assert_close(out.hidden_states[last], exp.hidden_states[last], 1e-4, f"{label} hidden_states[{last}]")
    assert_close(out.pooled, inner[0].pooler_output, 1e-4, f"{label} pooled")
    if hasattr(exp, "image_embeds"):
        assert_close(out.image_embeds, exp.image_embeds, 1e-4, f"{label} image_embeds")


def test_shapes():
    model = randomize_(CLIPVisionModel(TINY_CLIP_VISION)).eval()
    out = model(torch.randn(2, 3, 224, 224))
    assert len(out.hidden_states) == 25 and out.hidden_states[24].shape == (2, 257, 128)
    assert out.pooled.shape == (2, 128) and out.image_embeds.shape == (2, 32)
    b32 = CLIPVisionModel(replace(TINY_CLIP_VISION_B32, projection=None))
    out = b32(torch.randn(1, 3, 224, 224))
    assert out.hidden_states[-1].shape == (1, 50, 128) and out.image_embeds is None
    with pytest.raises(ValueError, match="224x224"):
        model(torch.randn(1, 3, 64, 64))


def test_openai_table_covers_every_tensor(tmp_path):
    source = randomize_(CLIPVisionModel(TINY_CLIP_VISION_B32)).eval()
    openai = hf_to_openai(source.state_dict(), half=False)
    back = clip_vision_from_openai({k[len("visual."):]: v for k, v in openai.items()})
    assert set(back) == set(source.state_dict())
    assert all(torch.equal(back[k], v) for k, v in source.state_dict().items())
    # as a file: OpenAI's text tower keys and logit_scale sit beside visual.* and are ignored
    text_tower = {"logit_scale": torch.ones(()), "token_embedding.weight": torch.zeros(8, 4),
                  "transformer.resblocks.0.ln_1.weight": torch.ones(4)}
    torch.save({**hf_to_openai(source.state_dict()), **text_tower}, tmp_path / "vit.pt")
    model = load_clip_vision(str(tmp_path / "vit.pt"))
    assert model.cfg == TINY_CLIP_VISION_B32 and model.visual_projection.weight.dtype == torch.float32


@pytest.mark.parity
def test_hf_layouts_on_tiny_models(tmp_path):
    transformers = pytest.importorskip("transformers")
    # CLIPModel (text + vision) as pytorch_model.bin with config.json; 4 heads of 32 come from config.json
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
    vision = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  patch_size=32)
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    ref = randomize_(transformers.CLIPModel(cfg)).eval()
    ref.save_pretrained(tmp_path / "clipmodel", safe_serialization=False)
    model = load_clip_vision(str(tmp_path / "clipmodel"))
    assert (model.cfg.heads, model.cfg.projection, model.cfg.layers) == (4, 32, 2)
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = ref.get_image_features(pixel_values=pixels)
        assert_close(model(pixels).image_embeds, expected, 1e-4, "CLIPModel image features")
    # a bare CLIPVisionModel file without config.json: no projection, heads = width // 64
    ref = randomize_(transformers.CLIPVisionModel(hf_config(TINY_CLIP_VISION_B32, transformers))).eval()
    ref.save_pretrained(tmp_path / "vision")
    model = load_clip_vision(str(tmp_path / "vision" / "model.safetensors"))
    assert model.cfg.projection is None and model.cfg.heads == 2
    compare(model, ref, pixels, "tiny CLIPVisionModel")


@pytest.mark.filterwarnings("ignore:`torch.jit")  # deprecated, but OpenAI's files are TorchScript
def test_bad_files_give_one_line_errors(tmp_path):
    model = CLIPVisionModel(TINY_CLIP_VISION_B32)
    from safetensors.torch import save_file
    save_file(model.state_dict(), tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    (tmp_path / "notes.bin").write_text("not a checkpoint\n")
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(2)}, tmp_path / "sd.safetensors")
    (tmp_path / "empty").mkdir()
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "jit.pt")  # as OpenAI's releases
    for name in ("cut.safetensors", "notes.bin", "sd.safetensors", "empty", "missing.pt", "jit.pt"):
        with pytest.raises(CheckpointError) as e:
            load_clip_vision(str(tmp_path / name))
        print(f"[{name}] {e.value}")
        assert "\n" not in str(e.value)


@pytest.mark.slow  # a full-size network: --runslow (CI runs it)
@pytest.mark.parity
def test_full_size_l14_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    ref = hf_model(transformers.CLIPVisionModelWithProjection, hf_config(CLIP_VISION_L14, transformers), 2)
    ref.save_pretrained(tmp_path)  # model.safetensors + config.json, as the HF ViT-L/14 folder
    model = load_clip_vision(str(tmp_path))
    assert model.cfg == CLIP_VISION_L14
    compare(model, ref, torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)), "L/14")


@pytest.mark.slow  # a full-size network: --runslow (CI runs it)
@pytest.mark.parity
def test_full_size_b32_openai_and_hf_layouts_match_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    ref = hf_model(transformers.CLIPVisionModelWithProjection, hf_config(CLIP_VISION_B32, transformers), 3)
    fp16_round_(ref)  # the weights ViT-B-32.pt can hold
    openai = {**hf_to_openai(ref.state_dict()), "logit_scale": torch.tensor(4.6052)}  # real: + text tower
    torch.save(openai, tmp_path / "ViT-B-32.pt")
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    model = load_clip_vision(str(tmp_path / "ViT-B-32.pt"))
    assert model.cfg == CLIP_VISION_B32
    compare(model, ref, pixels, "B/32 OpenAI fp16 file")
    ref.save_pretrained(tmp_path / "hf")
    compare(load_clip_vision(str(tmp_path / "hf")), ref, pixels, "B/32 HF folder")
