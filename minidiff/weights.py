"""Reading checkpoints and loading them strictly into minidiff modules.

Generic core (this section): read a state dict from .safetensors (lazily, only the keys asked for) or from a
pickled .ckpt/.bin/.pt (torch.load with weights_only=True, memory-mapped), and load it into a module built on the
meta device, so the weights exist once in memory. The per-family rename tables and loaders follow below.
"""
import os

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, or not the model it should be (one-line message)."""


def read_state_dict(path, prefix=""):
    """Tensors of `path` whose key starts with `prefix`, prefix removed. .safetensors is read lazily."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        try:
            with safe_open(path, framework="pt") as f:
                return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        except Exception as e:  # safetensors raises its own error types for truncated or foreign files
            raise CheckpointError(f"{path}: not a readable .safetensors file ({str(e).splitlines()[0]})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0][:200]})") from None
    # Lightning .ckpt nests the weights under "state_dict"; Diff-Plugin's tpb.pt / PromptTunner.pt under "model".
    for nest in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(nest), dict):
            obj = obj[nest]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return {k[len(prefix):]: v for k, v in obj.items() if isinstance(v, torch.Tensor) and k.startswith(prefix)}


def load_strict(model, state_dict, what, dtype=None, device="cpu", ignore=()):
    """Fill every parameter/buffer of `model` (usually built on the meta device) from `state_dict`.

    Every model tensor must be present with the same shape, and every checkpoint tensor used, except keys
    starting with one of `ignore`. Raises CheckpointError naming the first offenders. Returns the model in eval mode.
    """
    expected = model.state_dict()
    given = {k: v for k, v in state_dict.items() if not k.startswith(tuple(ignore))}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{what}: {len(missing)} missing keys {missing[:4]}, "
                              f"{len(unexpected)} unexpected keys {unexpected[:4]}")
    wrong = [f"{k} {tuple(given[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if tuple(given[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"{what}: {len(wrong)} shape mismatches (file vs model), first: {wrong[:3]}")
    # Floating tensors take the requested dtype; integer buffers keep theirs.
    cast = {k: v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
            for k, v in given.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    return model.eval().requires_grad_(False)
