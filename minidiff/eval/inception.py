"""The FID InceptionV3 network: 2048-d pool3 features for the Frechet Inception Distance.

Paper: Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium"
(NeurIPS 2017), on Szegedy et al., "Rethinking the Inception Architecture" (CVPR 2016).
Mirrors pytorch-fid 0.3.0 `pytorch_fid/inception.py` (mseitzer/pytorch-fid: `fid_inception_v3`,
FIDInceptionA/C/E_1/E_2) on torchvision's `torchvision/models/inception.py` (Inception3, BasicConv2d,
InceptionA-E). That port of TensorFlow's 2015-12-05 graph differs from torchvision's Inception in three
places, all kept here:
  - the 3x3 average pools of the A, C and E blocks ignore the zero padding (TF's "SAME" avg pool,
    count_include_pad=False);
  - the last E block (Mixed_7c) pools its fourth branch with a max pool, not an average pool;
  - batch norm uses eps = 0.001 (TF's default), like torchvision's BasicConv2d.
Parameter names equal those of `pt_inception-2015-12-05-6726825d.pth`, so the file loads strictly (its
1008-way `fc.*` classifier and any `num_batches_tracked` counters are skipped: FID uses the pool3 features
only).

Input path (pytorch-fid `ImagePathDataset` + `InceptionV3.forward`): PIL RGB -> [0, 1] float -> bilinear
resize to 299x299 (align_corners=False, no antialias) -> 2x - 1 -> network -> global average pool
-> [B, 2048].
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from minidiff.io.weights import load_strict, read_state_dict

INPUT_SIZE = 299  # the TF graph's input resolution; pytorch-fid resizes every image to it
FEATURE_DIM = 2048  # pool3 width
BN_EPS = 0.001  # TensorFlow's batch-norm epsilon, kept by the port


class BatchNorm(nn.Module):
    """Inference-only batch norm with nn.BatchNorm2d's parameter names (no num_batches_tracked counter)."""

    def __init__(self, ch):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ch))
        self.bias = nn.Parameter(torch.zeros(ch))
        self.register_buffer("running_mean", torch.zeros(ch))
        self.register_buffer("running_var", torch.ones(ch))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, eps=BN_EPS)


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm -> ReLU, the unit every Inception branch is made of."""

    def __init__(self, in_ch, out_ch, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = BatchNorm(out_ch)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool_same(x):
    """3x3 stride-1 average pool that, like TF's, divides by the number of real (unpadded) pixels."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d (35x35): 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1."""

    def __init__(self, in_ch, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_features, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(avg_pool_same(x))
        return torch.cat([b1, b5, b3, bp], 1)  # [B, 224 + pool_features, H, W]


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35x35 -> 17x17 (stride-2 3x3 convs beside a stride-2 max pool)."""

    def __init__(self, in_ch):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)  # [B, 384 + 96 + in_ch, H/2, W/2]


class InceptionC(nn.Module):
    """Mixed_6b-6e (17x17): factorised 7x7 convs as 1x7 and 7x1 pairs."""

    def __init__(self, in_ch, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(avg_pool_same(x))
        return torch.cat([b1, b7, bd, bp], 1)  # [B, 768, 17, 17]


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17x17 -> 8x8."""

    def __init__(self, in_ch):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)  # [B, 320 + 192 + in_ch, 8, 8]


class InceptionE(nn.Module):
    """Mixed_7b/7c (8x8): 3x3 convs split into parallel 1x3 and 3x1 halves.

    `max_pool` selects the pooling of the fourth branch: the FID graph's Mixed_7c uses a max pool
    (pytorch-fid's FIDInceptionE_2), Mixed_7b the padding-free average pool (FIDInceptionE_1).
    """

    def __init__(self, in_ch, max_pool=False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_ch, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)  # [B, 768, 8, 8]
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)  # [B, 768, 8, 8]
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else avg_pool_same(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], 1)  # [B, 2048, 8, 8]


class FIDInception(nn.Module):
    """InceptionV3 up to pool3. forward(x [B,3,H,W] in [0,1]) -> [B, 2048] (pytorch-fid's block 3 output)."""

    def __init__(self):
        super().__init__()
        # stem: 299 -> 149 -> 147 -> 147 -> (max pool) 73 -> 73 -> 71 -> (max pool) 35
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        # 35x35 blocks, reduction, 17x17 blocks, reduction, 8x8 blocks
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)

    def forward(self, x):
        # pytorch-fid: bilinear resize of the [0,1] image to 299x299 (unless done already), then to [-1, 1]
        if tuple(x.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
            x = resize_299(x)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [B, 192, 35, 35]
        blocks = (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                  self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)
        for block in blocks:
            x = block(x)
        return x.mean(dim=(2, 3))  # adaptive average pool to 1x1, flattened: [B, 2048]


def resize_299(x):
    """[B, 3, H, W] -> [B, 3, 299, 299]: pytorch-fid's bilinear resize (align_corners=False, no antialias)."""
    return F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)


def inception_pixels(image):
    """uint8 RGB array [H, W, 3] (or PIL image) -> [3, 299, 299] float32 network input in [0, 1].

    torchvision's ToTensor (uint8 / 255, as pytorch-fid's dataset applies) then the resize of
    InceptionV3.forward, done per image so that images of different sizes can share a batch.
    """
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255)  # [H, W, 3] -> [3, H, W]
    return resize_299(x[None])[0]


def load_inception(path, device="cpu"):
    """FIDInception from pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or those names, .safetensors)."""
    sd = read_state_dict(path)
    # Counters from nn.BatchNorm2d carry no information at inference; the 1008-way classifier is not used.
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    with torch.device("meta"):
        model = FIDInception()
    return load_strict(model, sd, f"FID Inception ({path})", dtype=torch.float32, device=device,
                       ignore=("fc.",))
