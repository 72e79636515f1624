"""Oracle for tests/test_inception.py: pytorch-fid's InceptionV3([3]) features of real images, random weights.

Run in the oracle environment: python fid_inception.py IMAGE_DIR WEIGHTS_OUT.pth FEATS_OUT.npy
Writes random weights in the layout of pt_inception-2015-12-05-6726825d.pth (torchvision Inception3 with
1008 classes, no aux head, as torch.save writes the state dict), loads them through pytorch-fid's own
fid_inception_v3 (its URL download replaced by the file), and saves the 2048-d features of each image,
loaded as pytorch-fid's ImagePathDataset loads it (PIL RGB -> ToTensor) and resized inside
InceptionV3.forward.
"""
import glob
import os
import sys

import numpy as np
import torch
import torchvision
from PIL import Image
from pytorch_fid import inception as pf

image_dir, weights_out, feats_out = sys.argv[1:4]
torch.manual_seed(0)
net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
sd = {}
for k, v in net.state_dict().items():
    if k.endswith("num_batches_tracked"):
        sd[k] = v
    elif v.dim() == 4:  # conv: He-scaled so that 17 random blocks keep activations O(1)
        sd[k] = torch.randn_like(v) * (2.0 / v[0].numel()) ** 0.5
    elif k.endswith("running_var") or k.endswith("bn.weight"):
        sd[k] = torch.rand_like(v) + 0.5
    else:
        sd[k] = torch.randn_like(v) * 0.1
torch.save(sd, weights_out)

pf.load_state_dict_from_url = lambda *a, **k: torch.load(weights_out, weights_only=True)
model = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
to_tensor = torchvision.transforms.ToTensor()
feats = []
for path in sorted(p for p in glob.glob(os.path.join(image_dir, "*")) if p.endswith((".jpg", ".png"))):
    x = to_tensor(Image.open(path).convert("RGB"))[None]  # images differ in size: one per batch
    with torch.no_grad():
        feats.append(model(x)[0].squeeze(3).squeeze(2).numpy())  # [1, 2048, 1, 1] -> [1, 2048]
np.save(feats_out, np.concatenate(feats))
print(len(feats), "images")
