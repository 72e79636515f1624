"""Tests for the SD/UNet sections of minidiff/io/weights.py and minidiff/io/loading.py: unet_from_diffusers, the
UNet config read from shapes, one-line errors for other model families and broken files, and
load_stable_diffusion.

Fast: rename-table coverage on a model-made state dict (every CompVis key reached, also at SD-1.5 size on the
meta device, and the diffusers-named Diff-Plugin SCB subset), config inference, error messages, a tiny
original single file (.safetensors and .ckpt) written from minidiff modules and loaded back tensor for tensor.
Parity (@pytest.mark.parity, needs diffusers + transformers): a tiny SD written from diffusers/transformers
modules as an original single file and as a diffusers folder (save_pretrained); the loaded UNet matches
diffusers.
Run: cd /work/main && python -m pytest tests/test_loading.py -q -s     (about 20 s on 2 CPU cores)
"""
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

import sd_layout
from helpers import assert_close
from minidiff.models.unet import TINY_UNET, UNet, UNetConfig
from minidiff.io.loading import build_unet, load_stable_diffusion, unet_config_from_state_dict
from minidiff.io.weights import CheckpointError, unet_from_diffusers


def model_state_dict(cfg, meta=False, seed=0):
    torch.manual_seed(seed)
    with torch.device("meta" if meta else "cpu"):
        return UNet(cfg).state_dict()


@pytest.mark.parametrize("cfg", [TINY_UNET, UNetConfig()], ids=["tiny", "sd15"])
def test_unet_from_diffusers_reaches_every_key(cfg):
    osd = model_state_dict(cfg, meta=True)
    blocks = len(cfg.channel_mult)
    dsd = sd_layout.original_to_unet(osd, cfg.num_res_blocks, cfg.attention_levels, blocks)
    assert any(k.startswith("up_blocks.0.upsamplers.0.conv.") for k in dsd)  # really diffusers names
    back = unet_from_diffusers(dsd)
    assert set(back) == set(osd) and all(back[k] is dsd[n] for n, k in zip(dsd, back))


def test_unet_from_diffusers_on_scb_names():
    """Diff-Plugin's SCB file: one diffusers down block, no downsampler, plus its own controlnet_* tensors."""
    sd = {n: torch.zeros(1) for n in ["time_embedding.linear_1.weight",
                                      "down_blocks.0.resnets.1.conv1.weight",
                                      "down_blocks.0.resnets.0.time_emb_proj.bias",
                                      "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight",
                                      "controlnet_cond_embedding.weight", "controlnet_down_blocks.2.bias"]}
    assert list(unet_from_diffusers(sd)) == [
        "time_embed.0.weight", "input_blocks.2.0.in_layers.2.weight", "input_blocks.1.0.emb_layers.1.bias",
        "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight", "controlnet_cond_embedding.weight",
        "controlnet_down_blocks.2.bias"]


@pytest.mark.parametrize("cfg", [
    TINY_UNET, UNetConfig(),
    replace(TINY_UNET, num_res_blocks=1, channel_mult=(1, 2), attention_levels=(1,)),
    replace(TINY_UNET, channel_mult=(1, 1, 2), attention_levels=(), context_dim=48)])
def test_config_from_shapes(cfg):
    assert unet_config_from_state_dict(model_state_dict(cfg, meta=True)) == cfg


def test_build_unet_loads_tensors_as_given():
    sd = model_state_dict(TINY_UNET)
    unet = build_unet(sd)
    assert unet.cfg == TINY_UNET and not unet.training
    assert all(torch.equal(v, sd[k]) for k, v in unet.state_dict().items())
    half = build_unet(sd, dtype=torch.float16)
    assert next(half.parameters()).dtype == torch.float16


@pytest.mark.parametrize("change, message", [
    (dict(in_channels=9), "in_channels 9: this looks like an SD inpainting UNet"),
    (dict(in_channels=8), "in_channels 8: this looks like an InstructPix2Pix UNet"),
    (dict(context_dim=1024), "context width 1024: this looks like SD 2.x; minidiff loads SD 1.x"),
    (dict(context_dim=2048), "context width 2048: this looks like SDXL"),
])
def test_other_unet_families_named(change, message):
    with pytest.raises(CheckpointError, match=message.replace(".", r"\.")):
        build_unet(model_state_dict(replace(TINY_UNET, **change), meta=True))


def test_sdxl_and_sd2_markers_named():
    sd = model_state_dict(TINY_UNET, meta=True)
    with pytest.raises(CheckpointError, match="label_emb/add_embedding .*SDXL"):
        build_unet({**sd, "label_emb.0.0.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="SDXL"):  # diffusers names
        build_unet({"conv_in.weight": torch.zeros(32, 4, 3, 3),
                    "add_embedding.linear_1.weight": torch.zeros(1)})
    key = "middle_block.1.proj_in.weight"
    with pytest.raises(CheckpointError, match="linear proj_in .*SD 2.x"):
        build_unet({**sd, key: sd[key][:, :, 0, 0]})
    with pytest.raises(CheckpointError, match="not a Stable Diffusion UNet"):
        build_unet({"foo.weight": torch.zeros(1)})


def tiny_single_file_dict(seed=0):
    """A tiny SD single file made from minidiff's own modules (names are the original ones already)."""
    from minidiff.models.clip import TINY_CLIP_TEXT, CLIPTextModel
    from minidiff.models.vae import TINY_VAE, AutoencoderKL
    torch.manual_seed(seed)
    parts = {"model.diffusion_model.": UNet(TINY_UNET), "first_stage_model.": AutoencoderKL(TINY_VAE),
             "cond_stage_model.transformer.": CLIPTextModel(
                 replace(TINY_CLIP_TEXT, width=TINY_UNET.context_dim))}
    return {p + k: v for p, m in parts.items() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_load_tiny_single_file(tmp_path, suffix):
    sd = tiny_single_file_dict()
    path = str(tmp_path / f"tiny{suffix}")
    save_file(sd, path) if suffix == ".safetensors" else torch.save({"state_dict": sd}, path)
    pipe = load_stable_diffusion(path)
    for prefix, model in [("model.diffusion_model.", pipe.unet), ("first_stage_model.", pipe.vae),
                          ("cond_stage_model.transformer.", pipe.text_encoder)]:
        assert all(torch.equal(v, sd[prefix + k]) for k, v in model.state_dict().items())
    ids = pipe.tokenizer(["a photo of a cat"])
    assert ids.shape == (1, 77)


def test_bad_files_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_stable_diffusion(str(tmp_path / "nothing.safetensors"))
    path = str(tmp_path / "tiny.safetensors")
    save_file(tiny_single_file_dict(), path)
    with open(path, "rb") as f:
        head = f.read(100_000)
    (tmp_path / "cut.safetensors").write_bytes(head)
    with pytest.raises(CheckpointError, match="not a readable .safetensors file"):
        load_stable_diffusion(str(tmp_path / "cut.safetensors"))
    save_file({"conditioner.embedders.0.x": torch.zeros(1)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(CheckpointError, match="conditioner.* text encoders: this looks like SDXL"):
        load_stable_diffusion(str(tmp_path / "xl.safetensors"))
    save_file({"text_model.x": torch.zeros(1)}, str(tmp_path / "clip.safetensors"))
    with pytest.raises(CheckpointError, match=r"no model.diffusion_model.\* tensors: not a Stable Diffusion"):
        load_stable_diffusion(str(tmp_path / "clip.safetensors"))
    folder = tmp_path / "folder"
    (folder / "unet").mkdir(parents=True)
    sd = {k[len("model.diffusion_model."):]: v for k, v in tiny_single_file_dict().items()
          if k.startswith("model.diffusion_model.")}
    save_file(sd, str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError,
                       match="diffusers folder has no vae/diffusion_pytorch_model.safetensors"):
        load_stable_diffusion(str(folder))


# ----------------------------------------------------------------------------------------------------------
# Parity: files written from diffusers / transformers modules
# ----------------------------------------------------------------------------------------------------------
def reference_parts():
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(block_out_channels=(32, 64, 64, 64), cross_attention_dim=32,
                                          attention_head_dim=8).eval()
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32).eval()
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, vocab_size=49408,
        max_position_embeddings=77)).eval()  # heads = width // 64: the only count minidiff reads from shapes
    with torch.no_grad():
        for p in [*unet.parameters(), *vae.parameters(), *text.parameters()]:
            p.add_(torch.randn_like(p), alpha=0.02)  # no parameter keeps its exact default (0 or 1)
    return unet, vae, text


def check_against_reference(pipe, unet):
    torch.manual_seed(1)
    x, ctx, t = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32), torch.tensor(700)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ctx).sample
        eps = pipe.unet(x, t, ctx)
    return eps, ref


@pytest.mark.parity
@pytest.mark.parametrize("layout", ["single.safetensors", "single.ckpt", "diffusers-folder"])
def test_load_reference_written_checkpoints(tmp_path, layout):
    unet, vae, text = reference_parts()
    path = tmp_path / layout
    if layout == "diffusers-folder":
        unet.save_pretrained(path / "unet")
        vae.save_pretrained(path / "vae")
        text.save_pretrained(path / "text_encoder")
    else:
        sd_layout.write_original_single_file(path, unet, vae, text)
    pipe = load_stable_diffusion(str(path))
    eps, ref = check_against_reference(pipe, unet)
    # fp32, identical operation order: a loading mistake would show as O(1) differences, not 1e-4
    assert_close(eps, ref, 1e-4, f"UNet eps via {layout}")
    ids = torch.randint(0, 49408, (1, 77))
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        hidden_ref = text(ids).last_hidden_state
    assert_close(hidden, hidden_ref, 1e-4, f"text hidden via {layout}")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean, _ = pipe.vae.encode(x)
        dist = vae.encode(x).latent_dist
        decoded, decoded_ref = pipe.vae.decode(mean), vae.decode(dist.mean).sample
    assert_close(mean, dist.mean, 1e-4, f"VAE mean via {layout}")
    assert_close(decoded, decoded_ref, 1e-4, f"VAE decode via {layout}")
