"""Tests for the CLIP text tower (minidiff/models/clip.py CLIPTextModel) and loading.build_clip_text.

Fast: shapes, the causal mask (a later token never changes earlier hidden states), the pooled index (first
end-of-text), the config read from shapes, the SD 2.x refusal, a checkpoint's position_ids ignored.
Parity (@pytest.mark.parity, needs transformers 4.x): random weights at the FULL ViT-L/14 text size (SD 1.x's
text encoder) written by transformers' save_pretrained (Hugging Face `text_model.*` names, the names inside
the SD single file), loaded by minidiff and by transformers; hidden states and pooled output compared (fp32).
Run: cd /work/main && python -m pytest tests/test_clip_text.py -q -s     (seconds; the FULL-size parity
test is marked slow: add --runslow, about 10 s more on 2 CPU cores)
"""
import functools

import pytest
import torch

from helpers import assert_close
from minidiff.models.clip import CLIP_TEXT_L14, TINY_CLIP_TEXT, CLIPTextModel
from minidiff.io.loading import build_clip_text
from minidiff.io.weights import CheckpointError, read_state_dict

BOS, EOS = 49406, 49407


def make_ids(lengths, seed=0):
    """Token ids as the tokenizer makes them: BOS, `n` ordinary tokens, EOS, EOS padding up to 77."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), 77), EOS)
    for row, n in enumerate(lengths):
        ids[row, 0] = BOS
        ids[row, 1:n + 1] = torch.randint(0, BOS, (n,), generator=g)
    return ids


def randomize_(model, seed=0):
    """Every tensor random (biases and LayerNorms too, so a swapped name cannot hide), with fan-in scaled
    weights so that activations stay O(1) through all layers and attention is far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, p[0].numel() ** -0.5, generator=g)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1, 0.1, generator=g)
            else:
                p.normal_(0, 0.1, generator=g)
    return model


def hf_model(cls, cfg, seed):
    """A transformers model with randomize_'s weights (its own init skipped: seconds at full size)."""
    from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = cls(cfg)
    return randomize_(model, seed).eval()


def test_shapes_and_pooled_at_first_eos():
    torch.manual_seed(0)
    model = randomize_(CLIPTextModel(TINY_CLIP_TEXT)).eval()
    ids = make_ids([3, 75, 0])
    hidden, pooled = model(ids)
    assert hidden.shape == (3, 77, 128) and pooled.shape == (3, 128)
    # first EOS: after BOS + n tokens (row 1 uses all 77 positions: EOS at 76)
    for row, pos in enumerate([4, 76, 1]):
        assert torch.equal(pooled[row], hidden[row, pos])


def test_causal_mask():
    model = randomize_(CLIPTextModel(TINY_CLIP_TEXT)).eval()
    ids = make_ids([20])
    changed = ids.clone()
    changed[0, 10] = 1234  # a later token changes ...
    a, _ = model(ids)
    b, _ = model(changed)
    assert torch.equal(a[:, :10], b[:, :10])  # ... nothing before it,
    assert not torch.allclose(a[:, 10:], b[:, 10:])  # and everything from it on


def test_sdpa_matches_explicit_attention(monkeypatch):
    """The SDPA path and the explicit softmax path of layers.attention agree on the causal text tower."""
    import minidiff.models.clip as clip
    model = randomize_(CLIPTextModel(TINY_CLIP_TEXT)).eval()
    ids = make_ids([7, 30])
    fast, _ = model(ids)
    monkeypatch.setattr(clip, "attention", functools.partial(clip.attention, sdpa=False))
    slow, _ = model(ids)
    assert_close(fast, slow, 1e-5, "sdpa vs explicit")  # same math, different summation order


def test_build_from_state_dict_infers_config_and_ignores_position_ids():
    source = randomize_(CLIPTextModel(TINY_CLIP_TEXT)).eval()
    sd = dict(source.state_dict())
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # carried by some SD files: ignored
    model = build_clip_text(sd)
    assert model.cfg == TINY_CLIP_TEXT
    ids = make_ids([5])
    assert torch.equal(model(ids)[0], source(ids)[0])
    half = build_clip_text(source.state_dict(), dtype=torch.float16)
    assert half.text_model.final_layer_norm.weight.dtype == torch.float16


def test_build_refuses_sd2_and_foreign_state_dicts():
    wide = {"text_model.embeddings.token_embedding.weight": torch.zeros(49408, 1024),
            "text_model.embeddings.position_embedding.weight": torch.zeros(77, 1024),
            "text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(4096, 1024)}
    with pytest.raises(CheckpointError, match="SD 2.x"):
        build_clip_text(wide)
    with pytest.raises(CheckpointError, match="not a CLIP text model"):
        build_clip_text({"model.diffusion_model.conv_in.weight": torch.zeros(1)})
    sd = dict(CLIPTextModel(TINY_CLIP_TEXT).state_dict())
    sd.pop("text_model.final_layer_norm.bias")
    with pytest.raises(CheckpointError, match="1 missing keys") as e:
        build_clip_text(sd)
    assert "\n" not in str(e.value)


@pytest.mark.slow  # a full-size network: --runslow (CI runs it)
@pytest.mark.parity
def test_full_size_text_encoder_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    # SD 1.x's text encoder config (openai/clip-vit-large-patch14): eos_token_id 2 = pooling at argmax(ids)
    hf_cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                         num_hidden_layers=12, num_attention_heads=12,
                                         max_position_embeddings=77, hidden_act="quick_gelu",
                                         layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    ref = hf_model(transformers.CLIPTextModel, hf_cfg, seed=1)
    ref.save_pretrained(tmp_path)  # model.safetensors with text_model.* names
    del ref
    model = build_clip_text(read_state_dict(str(tmp_path / "model.safetensors")))
    assert model.cfg == CLIP_TEXT_L14
    ref = transformers.CLIPTextModel.from_pretrained(tmp_path).eval()
    ids = make_ids([6, 75])
    with torch.no_grad():
        expected = ref(input_ids=ids)
        hidden, pooled = model(ids)
    # fp32, same math in a different kernel order (SDPA vs transformers' masked SDPA): ~1e-6 expected;
    # 1e-4 relative is the project's bound for all networks.
    assert_close(hidden, expected.last_hidden_state, 1e-4, "text hidden (L/14, full size)")
    assert_close(pooled, expected.pooler_output, 1e-4, "text pooled (L/14, full size)")
