"""Oracle for tests/test_evaluate.py: clean-fid's CLIP ViT-B/32 features, random weights as in ViT-B-32.pt.

Run in the oracle environment: python cleanfid_clip.py IMAGE_DIR WEIGHTS_OUT.pt FEATS_OUT.npy

Writes a random OpenAI ViT-B/32 CLIP state dict as torch.save writes ViT-B-32.pt's (visual.*, text tower,
logit_scale, input_resolution/context_length/vocab_size; conv, linear, attention weights and the projections
in float16 via open_clip's convert_weights_to_fp16, the rest float32). clean-fid's clip_features imports
OpenAI's `clip` package, which is not installed (its PyPI build imports pkg_resources): a stand-in `clip`
module gives clean-fid the same model through open_clip.load_openai_model (OpenAI's build_model, float32 on
the CPU, as clip.load(device="cpu") does). Then clean-fid's own pipeline runs: get_folder_features with
CLIP_fx and img_preprocess_clip (ResizeDataset: PIL RGB -> uint8 -> img_preprocess_clip -> ToTensor*255 ->
CLIP_fx).
"""
import sys
import types

import numpy as np
import open_clip
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, convert_weights_to_fp16

image_dir, weights_out, feats_out = sys.argv[1:4]
torch.manual_seed(0)
model = CLIP(512, CLIPVisionCfg(layers=12, width=768, patch_size=32, image_size=224),
             CLIPTextCfg(context_length=77, vocab_size=49408, width=512, heads=8, layers=12), quick_gelu=True)
with torch.no_grad():  # move layer norms, biases and embeddings off their trivial initial values
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.02)
convert_weights_to_fp16(model)
sd = dict(model.state_dict())
sd.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
torch.save(sd, weights_out)

clip_stub = types.ModuleType("clip")
clip_stub.load = lambda name, device="cpu", jit=False: (
    open_clip.load_openai_model(weights_out, precision="fp32", device="cpu"), None)
sys.modules["clip"] = clip_stub
from cleanfid.clip_features import CLIP_fx, img_preprocess_clip  # noqa: E402
from cleanfid.fid import get_folder_features  # noqa: E402

fx = CLIP_fx("ViT-B/32", device="cpu")
feats = get_folder_features(image_dir, fx, num_workers=0, batch_size=4, device=torch.device("cpu"),
                            mode="clean", custom_fn_resize=img_preprocess_clip, verbose=False)
np.save(feats_out, feats)
print(feats.shape, feats.dtype, fx.name)
