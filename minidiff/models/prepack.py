"""CPU inference: convolution kernels reordered once into oneDNN's blocked layout, instead of on every call.

On the CPU, torch.nn.functional.conv2d hands each call to oneDNN, which first copies the kernel
[O, I, kh, kw] into its own blocked layout (e.g. 16 output x 16 input channels per block). For the SD-1.5
UNet that is ~2 GB of kernels copied into freshly allocated memory on every forward: at 8x8 latents a
1280 -> 1280 conv spends two thirds of its time in that copy and its page faults. `prepack_convs(model)`
does the copy once, when the model is loaded for inference, and runs each conv through the same oneDNN
kernel with the packed weight. Outputs are bit-identical to F.conv2d on channels-last inputs.

    sd = load_stable_diffusion(path)          # minidiff.io.loading
    prepack_convs(sd.unet); prepack_convs(sd.vae)

The packed kernel is an opaque oneDNN tensor: a prepacked model is for inference only (no autograd through
its convolutions, no state_dict, no .to()); training keeps the plain nn.Conv2d. Where PyTorch has no oneDNN
(`torch.backends.mkldnn.is_available()` false), or the model is on the GPU or in fp16, nothing is changed:
cuDNN has no per-call kernel copy to save.

The other CPU-inference concern here is memory: `return_freed_memory()` hands glibc's freed heap back to the
OS (after packing, after a dropped network, before a restore's VAE decode, between the page's jobs).
"""
import ctypes

import torch
import torch.nn as nn


class PackedConv2d(nn.Module):
    """The inference forward of an nn.Conv2d (zero padding, any stride/dilation/groups) with its kernel packed
    once for oneDNN. Activations run channels-last (NHWC), oneDNN's fastest layout."""

    def __init__(self, conv):
        super().__init__()
        self.padding, self.stride, self.dilation, self.groups = conv.padding, conv.stride, conv.dilation, conv.groups
        # the dense kernel [O, I/groups, kh, kw] -> oneDNN's blocked layout (an opaque mkldnn tensor)
        self.packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
            conv.weight.detach().to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation),
            self.groups)
        self.bias = None if conv.bias is None else conv.bias.detach()

    def forward(self, x):
        # x: [B, I, H, W] -> [B, O, H', W'], channels-last
        x = x.contiguous(memory_format=torch.channels_last)
        return torch.ops.mkldnn._convolution_pointwise(x, self.packed, self.bias, list(self.padding),
                                                       list(self.stride), list(self.dilation), self.groups,
                                                       "none", [], "")


def prepack_convs(model):
    """Replace every 3x3 nn.Conv2d of a CPU fp32/bf16 model (UNet, VAE, SCB) by a PackedConv2d (inference
    only); returns the model.
    Unchanged where oneDNN is missing, or the model is on another device or in another dtype."""
    p = next(model.parameters(), None)
    if (p is None or p.device.type != "cpu" or p.dtype not in (torch.float32, torch.bfloat16)
            or not torch.backends.mkldnn.is_available()):
        return model
    # 3x3 only: 1x1 convs are plain GEMMs with small kernels, and oneDNN's packed 1x1 path measured
    # 2-17x slower than F.conv2d here (bf16 and fp32, batch 1); CLIP's 14x14 patch conv runs once per image
    targets = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Conv2d and child.kernel_size == (3, 3) and child.padding_mode == "zeros"
               and isinstance(child.padding, tuple)]
    # (parent, name) pairs, not the convs: each plain kernel is freed as soon as its packed one replaces it
    # (a list of the modules kept them all alive: +2 GiB at once for SD-1.5's UNet in fp32)
    for parent, name in targets:
        setattr(parent, name, PackedConv2d(getattr(parent, name)))
    return model


def return_freed_memory():
    """Give freed heap memory back to the OS (glibc's malloc_trim; elsewhere nothing). glibc serves blocks
    under its mmap threshold (up to 32 MiB: every CLIP weight) from its heap and keeps them when freed, so
    a dropped network would stay in the resident set until something of that size is allocated again."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator decides
        pass
