"""Tests for minidiff/models/vae.py (AutoencoderKL) and the VAE sections of minidiff/io/weights.py and loading.py.

Fast: shapes (odd sizes too), inputs left unmutated, the diffusers rename table (current and legacy attention
names) on diffusers-made state dicts, a clear error for a non-VAE state dict.
Parity (@pytest.mark.parity, needs diffusers): random weights written in the ORIGINAL single-file layout
(`first_stage_model.*`) by tests/sd_layout.py's vae_to_original, proved here by a round trip through
diffusers' own single-file conversion; then posterior mean, logvar and decode against diffusers'
AutoencoderKL at full SD-1.5 size on a 64x64 image, and on a tiny config at an odd size.
Run: cd /work/main && python -m pytest tests/test_vae.py -q -s --runslow     (about 8 s on a quiet 2-core
machine; the full-size parity test is marked slow and needs --runslow)
"""
import re

import pytest
import torch
from safetensors.torch import save_file

from helpers import assert_close
from sd_layout import vae_to_original
from minidiff.models.vae import LATENT_SCALE, TINY_VAE, AutoencoderKL, VAEConfig
from minidiff.io.loading import build_vae
from minidiff.io.weights import CheckpointError, read_state_dict, vae_from_diffusers


# diffusers attention names: current -> legacy (the names of older diffusers files such as SD-1.4's vae/)
LEGACY_ATTN = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def diffusers_vae(block_out_channels, layers_per_block, seed=0):
    """A diffusers AutoencoderKL with random weights (every tensor perturbed, so no bias stays exactly 0)."""
    from diffusers import AutoencoderKL as DiffusersVAE
    torch.manual_seed(seed)
    n = len(block_out_channels)
    model = DiffusersVAE(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=block_out_channels,
                         layers_per_block=layers_per_block, latent_channels=4, norm_num_groups=32,
                         scaling_factor=LATENT_SCALE)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


# ---------------------------------------------------------------- fast unit tests (tiny config, no files)

def test_shapes_odd_sizes_and_inputs_unmutated():
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY_VAE).eval()  # 2 levels: one 2x downsampling
    for h, w in [(16, 16), (15, 17)]:
        x = torch.rand(2, 3, h, w) * 2 - 1
        x0 = x.clone()
        with torch.no_grad():
            mean, logvar = vae.encode(x)
            assert mean.shape == logvar.shape == (2, 4, h // 2, w // 2)
            assert logvar.min() >= -30 and logvar.max() <= 20
            z = mean.clone()
            img = vae.decode(z)
        assert img.shape == (2, 3, 2 * (h // 2), 2 * (w // 2))
        assert torch.equal(x, x0) and torch.equal(z, mean), "encode/decode modified an input"
    full = VAEConfig()
    assert full.ch_mult == (1, 2, 4, 4) and full.z_channels == 4 and LATENT_SCALE == 0.18215


@pytest.mark.parametrize("legacy", [False, True])
def test_rename_covers_every_key(legacy):
    """Every diffusers key (current or legacy attention names) maps onto exactly minidiff's keys."""
    torch.manual_seed(0)
    pytest.importorskip("diffusers")
    dsd = diffusers_vae((TINY_VAE.ch, 2 * TINY_VAE.ch), TINY_VAE.num_res_blocks).state_dict()
    if legacy:
        dsd = {re.sub(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.",
                      lambda m: f"attentions.0.{LEGACY_ATTN[m[1]]}.", k): v for k, v in dsd.items()}
        assert any(".query." in k for k in dsd)
    osd = vae_from_diffusers(dsd)
    model_sd = AutoencoderKL(TINY_VAE).state_dict()
    assert sorted(osd) == sorted(model_sd)
    assert all(osd[k].shape == model_sd[k].shape for k in model_sd)
    vae = build_vae(dsd)  # diffusers names are recognised and renamed by the builder
    assert vae.cfg == TINY_VAE and not next(vae.parameters()).is_meta


def test_build_vae_config_from_shapes_and_bad_input():
    torch.manual_seed(0)
    sd = AutoencoderKL(TINY_VAE).state_dict()
    extra = {"loss.logvar": torch.zeros(()), "model_ema.decay": torch.ones(())}  # kl-f8 file extras: ignored
    vae = build_vae({**sd, **extra}, dtype=torch.float16)
    assert vae.cfg == TINY_VAE and vae.quant_conv.weight.dtype == torch.float16
    with pytest.raises(CheckpointError, match="not an SD AutoencoderKL"):
        build_vae({"model.diffusion_model.conv.weight": torch.zeros(1)})
    sd.pop("decoder.norm_out.bias")
    with pytest.raises(CheckpointError, match="1 missing keys"):
        build_vae(sd)


# ---------------------------------------------------------------- parity with diffusers 0.35.2

def original_file(ref, tmp_path):
    """Write `ref`'s weights as an SD single file (first_stage_model.*) and prove the layout with diffusers'
    own converter: converting back must give diffusers' state dict exactly."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    dsd = ref.state_dict()
    osd = {f"first_stage_model.{k}": v.contiguous() for k, v in
           vae_to_original(dsd, len(ref.config.block_out_channels)).items()}
    back = convert_ldm_vae_checkpoint(dict(osd), dict(ref.config))
    assert sorted(back) == sorted(dsd), "writer and diffusers' converter disagree on the key set"
    for k, v in dsd.items():
        assert torch.equal(back[k].reshape(v.shape), v), f"round trip changed {k}"
    path = tmp_path / "sd-vae.safetensors"
    save_file(osd, str(path))
    return path


def compare(ref, vae, x, tol):
    with torch.no_grad():
        post = ref.encode(x).latent_dist
        mean, logvar = vae.encode(x)
        assert_close(mean, post.mean, tol, "vae mean")
        assert_close(logvar, post.logvar, tol, "vae logvar")
        z = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
        assert_close(vae.decode(z), ref.decode(z).sample, tol, "vae decode")


@pytest.mark.slow  # a full-size network: --runslow (CI runs it)
@pytest.mark.parity
def test_parity_full_size(tmp_path):
    """SD-1.5-size VAE (83M parameters) loaded from the original layout vs diffusers, 64x64 image."""
    pytest.importorskip("diffusers")
    ref = diffusers_vae((128, 256, 512, 512), 2)
    path = original_file(ref, tmp_path)
    vae = build_vae(read_state_dict(str(path), "first_stage_model."))
    assert vae.cfg == VAEConfig()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    # Same fp32 math in a different order (conv/GroupNorm kernels, SDPA vs diffusers' attention processor):
    # observed ~1e-6 relative; 1e-4 x max(1, max|ref|) is the project-wide fp32 bound.
    compare(ref, vae, x, 1e-4)


@pytest.mark.parity
def test_parity_tiny_odd_size(tmp_path):
    """Tiny config at an odd size: the asymmetric downsampling pad must match diffusers'."""
    pytest.importorskip("diffusers")
    ref = diffusers_vae((32, 64), 1, seed=3)
    vae = build_vae(read_state_dict(str(original_file(ref, tmp_path)), "first_stage_model."))
    x = torch.rand(1, 3, 15, 21, generator=torch.Generator().manual_seed(0)) * 2 - 1
    compare(ref, vae, x, 1e-4)  # fp32 reordering only, as above
