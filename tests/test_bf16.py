"""bf16 on the CPU: --dtype auto and the native-bf16 check (minidiff/io/cpu.py, tools/_cli.py resolve_device),
and the error of every network and of a whole restore in bf16 against the same weights in fp32.

Yardstick (@pytest.mark.parity, needs diffusers + transformers): diffusers'/transformers' own bf16-vs-fp32
error on the same weights and inputs. PyTorch's CPU bf16 kernels (GroupNorm, LayerNorm, SDPA's softmax,
SiLU/GELU, conv and matmul) all accumulate in fp32 and round once, so no module needs an explicit fp32 upcast;
measured per op against fp64 their error equals the bf16 rounding of the exact result (2^-9 relative), except
the explicit-attention path (softmax probabilities rounded before @ v: 10x that; SDPA is the default). The
timestep embedding is computed in fp32 and rounded once to bf16, as diffusers does.
One exception, fixed in minidiff: PyTorch's channels-last CPU GroupNorm (minidiff's activations are channels-last)
takes the variance as E[x^2] - E[x]^2 and loses digits when a group's mean is large against its spread (bf16
6.4e-1, fp32 2.7e-2 at mean/std 200); minidiff.models.layers.GroupNorm shifts each group by its mean first (fp32:
the exact mean; bf16: a sampled estimate, applied only where the mean is over 4 standard deviations from zero; both
leave the output's rounding as the only error, per op against fp64). Found per op with hooks (bf16 module on its
actual bf16 input vs its fp32 twin on the same input): every Linear, conv, LayerNorm and attention of the tiny UNet
gave the same bf16 output as diffusers' bit for bit, up to the first channels-last GroupNorm whose input mean was
off zero (seed 0 input_blocks.2.1.norm); with contiguous GroupNorm inputs minidiff's UNet matches diffusers' bf16
output exactly (1.00x, seeds 0-2), and before the fix seed 0 was 1.25x (2.15e-2 vs 1.72e-2) on an AMX CPU.
Since then the UNet's norms run bf16 on an NCHW copy (nchw_copy=True: its activations are small) and the UNet's bf16
output equals diffusers' again (seeds 0, 1: 1.72e-2, 1.60e-2 on an AMX CPU, 1.00x), while the VAE keeps the sampled
shift (its 512 px activations make copies expensive): encode 1.31e-2 (diffusers 1.15e-2), decode 1.72e-2 (1.91e-2)
on the AMX CPU. Earlier, with the sampled shift in the UNet too, on an AVX512-BF16 CPU without AMX:
UNet seeds 0, 1 2.15e-2, 1.47e-2 (diffusers 1.91e-2, 1.42e-2: 1.13x, 1.04x; with the fp32 centring that the shift
replaced 1.86e-2, 1.38e-2: rounding noise of the same size), VAE encode 1.20e-2 (1.31e-2), decode 2.07e-2
(2.18e-2), CLIP text 1.07e-2 and CLIP vision hidden_states[24] 2.46e-2, equal to transformers' to the last digit.
Run: cd /work/main && python -m pytest tests/test_bf16.py -q -s      (about 10 s on one thread)
"""
import argparse
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sd_layout
from helpers import assert_close
import _cli  # tools/, on sys.path through helpers
from minidiff.io import cpu
from minidiff.models.clip import TINY_CLIP_TEXT
from minidiff.io.loading import build_clip_text, build_unet, build_vae, load_clip_vision, load_stable_diffusion
from minidiff.io.weights import vae_from_diffusers

BF16 = torch.bfloat16


# ------------------------------------------------------------------------------ --dtype auto, native bf16

def resolve(device="cpu", dtype="auto", native=True, cuda=False, monkeypatch=None):
    monkeypatch.setattr(_cli, "native_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    args = argparse.Namespace(device=device, dtype=dtype)
    return _cli.resolve_device(args), args


def test_dtype_auto_picks_bf16_only_on_a_native_bf16_cpu(monkeypatch, capsys):
    assert resolve(native=True, monkeypatch=monkeypatch)[0] == torch.bfloat16
    dtype, args = resolve(native=False, monkeypatch=monkeypatch)
    assert dtype == torch.float32 and args.dtype == "fp32"  # the record says what ran, not "auto"
    dtype, args = resolve(device="auto", native=True, cuda=True, monkeypatch=monkeypatch)
    assert dtype == torch.float16 and args.device == "cuda"
    assert capsys.readouterr().err == ""
    parser = argparse.ArgumentParser()
    _cli.add_device_flags(parser.add_argument)
    assert parser.parse_args([]).dtype == "fp32"  # the default stays fp32: the same numbers everywhere


def test_explicit_bf16_on_a_cpu_without_native_bf16_warns_but_runs(monkeypatch, capsys):
    assert resolve(dtype="bf16", native=False, monkeypatch=monkeypatch)[0] == torch.bfloat16
    err = capsys.readouterr().err
    assert err.startswith("warning:") and "slower than fp32" in err and err.count("\n") == 1
    resolve(dtype="bf16", native=True, monkeypatch=monkeypatch)
    assert capsys.readouterr().err == ""
    with pytest.raises(_cli.UsageError, match="fp16 needs --device cuda"):
        resolve(dtype="fp16", monkeypatch=monkeypatch)


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_features", lambda: {"avx2", "avx512_f"})
    assert not cpu.native_bf16()
    for flag in ("avx512_bf16", "amx_bf16"):
        monkeypatch.setattr(cpu, "cpu_features", lambda: {"avx2", flag})
        assert cpu.native_bf16()


def test_proc_cpuinfo_fallback_agrees_with_torch(monkeypatch):
    try:
        open("/proc/cpuinfo").close()
    except OSError:
        pytest.skip("no /proc/cpuinfo (not Linux)")
    from_torch = cpu.native_bf16()
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    assert cpu.native_bf16() == from_torch


# ------------------------------------------------------------------------------- bf16 vs fp32, per network

def rel_err(actual, expected):
    """max|actual - expected| / max|expected| (both as float64)."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def check_bf16(name, mine, mine_bf16, ref, ref_bf16):
    """minidiff's bf16 error about the reference library's own on the same weights (at most 1.25x: measured
    0.96..1.11x, the kernels order their bf16 roundings differently), and under 4e-2 (the largest measured
    is 2.5e-2; a missing fp32 accumulation anywhere would show as 2-10x, see the op figures above)."""
    err, yardstick = rel_err(mine_bf16, mine), rel_err(ref_bf16, ref)
    print(f"[{name}] bf16 vs fp32: minidiff {err:.2e}, reference {yardstick:.2e}")
    assert err <= 1.25 * yardstick and err <= 4e-2, f"{name}: bf16 error {err:.2e} (ref. {yardstick:.2e})"


@pytest.mark.parametrize("dtype,nchw_copy", [(torch.float32, False), (BF16, False), (BF16, True)])
def test_channels_last_groupnorm_against_fp64_at_large_means(dtype, nchw_copy):
    """minidiff.models.layers.GroupNorm on channels-last input (fp32: centred by the exact group mean; bf16: by a
    sampled mean where it is far from zero) against float64 F.group_norm of the same input, groups whose mean is
    0 to 3000 times their spread: the error stays the output's rounding, |y - ref| / (|ref| + 1) measured at most
    5.4e-7 (fp32) and 3.1e-3 (bf16, one ulp is 3.9e-3). PyTorch's plain channels-last kernel on the same input
    errs 9.6e-3 (fp32) and 0.18 (bf16) at mean 200: the bounds below would catch it. bf16 both ways: the NCHW
    copy (the UNet's norms, nchw_copy=True) and the sampled shift (the VAE's)."""
    from minidiff.models.layers import GroupNorm
    g = torch.Generator().manual_seed(0)
    norm = GroupNorm(8, 64, eps=1e-6, nchw_copy=nchw_copy)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)
        norm.bias.uniform_(-0.5, 0.5, generator=g)
    norm = norm.to(dtype)
    bound = 2e-6 if dtype == torch.float32 else 2 ** -8
    for offset in (0.0, 3.0, 20.0, 200.0, -3000.0):
        x = torch.randn(2, 64, 48, 40, generator=g) + offset + torch.randn(1, 64, 1, 1, generator=g)
        x = x.to(dtype).contiguous(memory_format=torch.channels_last)  # [2, 64, 48, 40], as the convs leave it
        ref = F.group_norm(x.double().contiguous(), 8, norm.weight.double(), norm.bias.double(), 1e-6)
        with torch.no_grad():
            y = norm(x)
            plain = F.group_norm(x, 8, norm.weight, norm.bias, 1e-6)
        err = lambda out: ((out.double() - ref).abs() / (ref.abs() + 1)).max().item()  # noqa: E731
        assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
        assert err(y) <= bound, f"offset {offset}: {err(y):.2e}"
        if offset == 200.0:
            assert err(plain) > 2 * bound  # the kernel this class exists to correct


@pytest.mark.parity
@pytest.mark.parametrize("seed", [0, 1])
def test_unet_bf16(seed):
    from test_unet import TINY_DIFFUSERS, diffusers_unet
    ref = diffusers_unet(seed=seed, **TINY_DIFFUSERS)
    osd = {k: v.detach() for k, v in sd_layout.unet_to_original(ref.state_dict(), 2).items()}
    unet, unet_bf16, ref_bf16 = build_unet(osd), build_unet(osd, dtype=BF16), copy.deepcopy(ref).to(BF16)
    assert unet_bf16.out[2].weight.dtype == BF16
    torch.manual_seed(seed)
    x, ctx, t = torch.randn(2, 4, 16, 16), torch.randn(2, 6, 32), torch.tensor([981, 1])
    with torch.no_grad():
        outs = [unet(x, t, ctx), unet_bf16(x.to(BF16), t, ctx.to(BF16)),
                ref(x, t, encoder_hidden_states=ctx).sample,
                ref_bf16(x.to(BF16), t, encoder_hidden_states=ctx.to(BF16)).sample]
    assert outs[1].dtype == BF16
    check_bf16(f"UNet seed {seed}", *outs)


@pytest.mark.parity
def test_vae_bf16():
    from test_vae import diffusers_vae
    ref = diffusers_vae((32, 64), 1, seed=1)
    osd = {k: v.detach() for k, v in vae_from_diffusers(ref.state_dict()).items()}
    vae, vae_bf16, ref_bf16 = build_vae(osd), build_vae(osd, dtype=BF16), copy.deepcopy(ref).to(BF16)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        check_bf16("VAE encode", vae.encode(x)[0], vae_bf16.encode(x.to(BF16))[0],
                   ref.encode(x).latent_dist.mean, ref_bf16.encode(x.to(BF16)).latent_dist.mean)
        check_bf16("VAE decode", vae.decode(z), vae_bf16.decode(z.to(BF16)),
                   ref.decode(z).sample, ref_bf16.decode(z.to(BF16)).sample)


@pytest.mark.parity
def test_clip_text_bf16():
    from transformers import CLIPTextConfig, CLIPTextModel
    from test_clip_text import make_ids, randomize_
    c = TINY_CLIP_TEXT
    ref = randomize_(CLIPTextModel(CLIPTextConfig(
        vocab_size=c.vocab_size, max_position_embeddings=c.max_positions, hidden_size=c.width,
        intermediate_size=c.mlp, num_hidden_layers=c.layers, num_attention_heads=c.heads,
        hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2))).eval()
    sd = {k: v.detach() for k, v in ref.state_dict().items()}
    model, model_bf16 = build_clip_text(sd), build_clip_text(sd, dtype=BF16)
    ref_bf16 = copy.deepcopy(ref).to(BF16)
    ids = make_ids([5, 30, 75])
    with torch.no_grad():
        check_bf16("CLIP text", model(ids)[0], model_bf16(ids)[0], ref(ids).last_hidden_state,
                   ref_bf16(ids).last_hidden_state)


# -------------------------------------------------- CLIP vision and a whole restore, from the official files

@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """Tiny SD (diffusers folder), tiny 24-layer CLIP vision and one official derain plugin, written once."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import official_oracle as oracle
    root = tmp_path_factory.mktemp("official")
    _, _, _, clip = oracle.make_sd_and_clip(str(root))
    oracle.make_plugin(str(root / "pre-trained" / "derain"), seed=10)
    return root, clip


@pytest.mark.parity
def test_clip_vision_bf16(official):
    root, ref = official
    model, model_bf16 = (load_clip_vision(str(root / "clip"), dtype=d) for d in (torch.float32, BF16))
    ref_bf16 = copy.deepcopy(ref).to(BF16)
    px = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # Diff-Plugin's TPB input: hidden_states[24], patch tokens
        mine = [m(px).hidden_states[24][:, 1:] for m in (model, model_bf16)]
        ref_out = [r(p, output_hidden_states=True).hidden_states[24][:, 1:]
                   for r, p in ((ref, px), (ref_bf16, px.to(BF16)))]
    check_bf16("CLIP vision [24]", *mine, *ref_out)


@pytest.mark.parity
def test_restore_bf16_close_to_fp32(official):
    """The whole Diff-Plugin loop (CLIP, TPB, SCB, 20 UniPC steps, VAE) in bf16 against fp32, tiny networks.
    Measured: max 5/255, mean 0.81/255 (derain and lowlight plugins alike; the image's std is 42/255). Bounds:
    12/255 max (every network's ~2e-2 bf16 error, carried through 20 steps, moves a few pixels by a few
    levels) and 2/255 mean (what a viewer sees)."""
    from minidiff.plugin.plugin import restore
    from minidiff.plugin.files import load_plugin
    from PIL import Image
    root, _ = official
    rng = np.random.default_rng(1)
    small = Image.fromarray(rng.integers(0, 256, (20, 26, 3), dtype=np.uint8))
    original = small.resize((203, 154), Image.BICUBIC)  # test_plugin's photo: smooth, not a multiple of 8
    image = original.resize((101, 77), Image.BICUBIC)
    outs = []
    for dtype in (torch.float32, BF16):
        sd = load_stable_diffusion(str(root / "sd"), dtype=dtype)
        clip = load_clip_vision(str(root / "clip"), dtype=dtype)
        plugin = load_plugin(root / "pre-trained" / "derain", dtype=dtype)
        assert next(sd.unet.parameters()).dtype == next(plugin.parameters()).dtype == dtype
        outs.append(np.asarray(restore(sd, clip, [plugin], image, clip_image=original, progress=False)))
    d = np.abs(outs[1].astype(int) - outs[0].astype(int))
    print(f"[restore bf16 vs fp32] max|diff| {d.max()}/255, mean {d.mean():.3f}; ref std {outs[0].std():.1f}")
    assert outs[0].std() > 10, "degenerate reference image: the comparison would prove little"
    assert d.max() <= 12 and d.mean() <= 2
