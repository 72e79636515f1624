"""Diff-Plugin files: the Task-Plugins and the Plugin-Selector, read and written in both layouts.

Official layout (yuhaoliu7456/Diff-Plugin @ 79e12bb, pre-trained/; train.py l.385-404 writes it):
    <task>/scb/config.json + <task>/scb/diffusion_pytorch_model.bin   SCB, diffusers names (save_pretrained)
    <task>/tpb.pt                                                     {'model': TPB state dict}
    plugin_selector/PromptTunner.pt                                   {'model': selector state dict}
Keys may carry DataParallel's `module.` prefix. Pickles are read only through torch.load(weights_only=True).
minidiff layout: one `<task>.safetensors` per plugin (keys `tpb.*`, `scb.*`; metadata format, task, heads,
base_model, steps_trained, ...) and `selector.safetensors`. The SCB rename table lives in weights.py.

    plugin = load_plugin("pre-trained/derain")          # or "plugins/derain.safetensors"
    save_plugin(plugin, "plugins/derain.safetensors", {"base_model": "CompVis/stable-diffusion-v1-4"})
    export_official_plugin(plugin, "exported/derain")   # loads in the official infer.py / demo.py
"""
import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minidiff.io.files import atomic_write
from minidiff.plugin.plugin import SCB, TASKS, TPB, PluginConfig, TaskPlugin
from minidiff.plugin.selector import PluginSelector
from minidiff.io.weights import (CheckpointError, load_strict, read_state_dict, scb_from_diffusers,
                              scb_to_diffusers)

PLUGIN_FORMAT = "minidiff-plugin"  # safetensors metadata "format" of minidiff's one-file plugins
SELECTOR_FORMAT = "minidiff-selector"  # ... and of minidiff's selector files
OFFICIAL_BASE_MODEL = "CompVis/stable-diffusion-v1-4"  # the official plugins' base model (infer.py l.22)
SCB_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # in <task>/scb/


def read_format(path):
    """The safetensors metadata "format" of `path` ('' when none); CheckpointError when not safetensors."""
    try:
        with safe_open(path, framework="pt") as f:  # reads the header only
            return (f.metadata() or {}).get("format", "")
    except Exception as e:  # safetensors' own error types: truncated, not safetensors at all
        raise CheckpointError(f"{path}: not a readable .safetensors file "
                              f"({str(e).splitlines()[0]})") from None


def save_sorted(tensors, path, metadata):
    """safetensors' save_file, then its metadata rewritten in sorted key order, so that the same tensors and
    metadata give the same bytes on every run. (save_file keeps the metadata in a Rust HashMap, whose order
    changes from process to process.) The header's JSON keeps its length, so only the header is rewritten."""
    save_file(tensors, path, metadata=metadata)
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")  # the header: 8-byte length, then JSON padded with spaces
        header = json.loads(f.read(size))
        meta = header.pop("__metadata__", None)
        ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | header
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # cannot happen for the same keys and values; keep save_file's bytes then
            return
        f.seek(8)
        f.write(text + b" " * (size - len(text)))


def read_metadata(path):
    """All safetensors metadata of `path` as a dict."""
    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


def _cpu_contiguous(state_dict):
    return {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}


# --------------------------------------------------------------------------------------------------------
# Task-Plugins
# --------------------------------------------------------------------------------------------------------

def strip_module_prefix(state_dict):
    """Drop the `module.` prefix DataParallel/DDP training leaves on every key (official tpb.pt may)."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def config_from_state_dicts(tpb_state, scb_state, heads):
    """PluginConfig from the TPB and SCB (minidiff names) tensor shapes; the head count is not in them."""
    try:
        clip_dim = tpb_state["visual_projection.0.weight"].shape[1]
        context_dim = tpb_state["visual_projection.6.weight"].shape[0]
        channels, latent_channels = scb_state["input_blocks.0.0.weight"].shape[:2]
    except KeyError as e:
        raise CheckpointError(f"plugin: no tensor {e}; not a Diff-Plugin TPB/SCB state dict") from None
    return PluginConfig(clip_dim=clip_dim, context_dim=context_dim, latent_channels=latent_channels,
                        channels=channels, heads=heads)


def build_plugin(task, tpb_state, scb_state, heads, metadata=None, dtype=None, device="cpu"):
    """TaskPlugin from minidiff-named state dicts (strict, built on the meta device, no weight copy)."""
    cfg = config_from_state_dicts(tpb_state, scb_state, heads)
    with torch.device("meta"):
        tpb, scb = TPB(cfg), SCB(cfg)
    load_strict(tpb, tpb_state, f"{task} TPB", dtype=dtype, device=device)
    load_strict(scb, scb_state, f"{task} SCB", dtype=dtype, device=device)
    return TaskPlugin(task, tpb, scb, metadata).eval()


def read_scb_config(folder):
    """Official scb/config.json -> number of heads, after checking it describes the SCB implemented here."""
    path = os.path.join(folder, "scb", "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the SCB config ({e})") from None
    heads = cfg.get("attention_head_dim", 8)
    heads = heads[0] if isinstance(heads, list) else heads
    expect = {"down_block_types": ["CrossAttnDownBlock2D"], "layers_per_block": 2, "norm_num_groups": 32}
    for key, value in expect.items():
        if cfg.get(key, value) != value:
            raise CheckpointError(f"{path}: {key} = {cfg[key]!r}, but a Diff-Plugin SCB has {value!r}")
    return int(heads)


def load_plugin(path, task=None, dtype=torch.float32, device="cpu"):
    """Load a Task-Plugin: an official folder (`<task>/scb/`, `<task>/tpb.pt`) or a minidiff .safetensors.

    task defaults to the folder name / the file's metadata / the file stem.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        heads = read_scb_config(path)
        scb_dir = os.path.join(path, "scb")
        files = [os.path.join(scb_dir, n) for n in SCB_WEIGHTS if os.path.isfile(os.path.join(scb_dir, n))]
        if not files:
            raise CheckpointError(f"{scb_dir}: no diffusion_pytorch_model.bin or .safetensors")
        scb_state = scb_from_diffusers(strip_module_prefix(read_state_dict(files[0])))
        tpb_state = strip_module_prefix(read_state_dict(os.path.join(path, "tpb.pt")))
        task = task or os.path.basename(os.path.normpath(path))
        meta = {"source": "official", "base_model": OFFICIAL_BASE_MODEL}  # trained on SD-1.4 (facts 7)
        return build_plugin(task, tpb_state, scb_state, heads, meta, dtype, device)
    if not path.endswith(".safetensors"):
        raise CheckpointError(f"{path}: not a plugin folder (scb/ + tpb.pt) nor a .safetensors file")
    if read_format(path) != PLUGIN_FORMAT:
        raise CheckpointError(f"{path}: no '{PLUGIN_FORMAT}' metadata; not a minidiff plugin file")
    meta = read_metadata(path)
    state_dict = read_state_dict(path)
    tpb_state = {k[4:]: v for k, v in state_dict.items() if k.startswith("tpb.")}
    scb_state = {k[4:]: v for k, v in state_dict.items() if k.startswith("scb.")}
    task = task or meta.get("task") or os.path.basename(path)[:-len(".safetensors")]
    return build_plugin(task, tpb_state, scb_state, int(meta.get("heads", 8)), meta, dtype, device)


def save_plugin(plugin, path, metadata=None):
    """Write `plugin` as one minidiff .safetensors (atomically). metadata: e.g. steps_trained, and
    `base_model`, the Stable Diffusion the plugin was trained with (a plugin only fits the UNet it was
    trained beside; tools/sample.py warns when it runs on another). The file always says a base_model:
    the given one, else the plugin's own metadata's, else "unknown"."""
    meta = {k: str(v) for k, v in {**plugin.metadata, **(metadata or {})}.items()}
    meta.setdefault("base_model", "unknown")
    meta.update(format=PLUGIN_FORMAT, task=plugin.task, heads=str(plugin.scb.cfg.heads))
    tensors = _cpu_contiguous(plugin.state_dict())
    atomic_write(path, lambda tmp: save_sorted(tensors, tmp, meta))


def _is_plugin_file(path):
    try:
        return read_format(path) == PLUGIN_FORMAT
    except CheckpointError:  # not a readable safetensors file: not a plugin
        return False


def _is_official_plugin(folder):
    """An official plugin folder with every file its loader reads (an interrupted download is not one)."""
    scb = os.path.join(folder, "scb")
    return all(os.path.isfile(os.path.join(folder, n)) for n in ("scb/config.json", "tpb.pt")) \
        and any(os.path.isfile(os.path.join(scb, n)) for n in SCB_WEIGHTS)


def find_plugins(folder):
    """Plugins in `folder` -> {task: path}, official tasks first in TASKS order, then others by name.

    Recognises `<task>/scb/config.json` + `scb/diffusion_pytorch_model.{bin,safetensors}` + `<task>/tpb.pt`
    (official) and `<task>.safetensors` with minidiff plugin metadata (preferred when both exist). Other
    files (a selector.safetensors, notes, an incomplete download) are ignored.
    """
    found = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        full = os.path.join(folder, name)
        if os.path.isdir(full) and _is_official_plugin(full):
            found.setdefault(name, full)
        elif name.endswith(".safetensors") and os.path.isfile(full) and _is_plugin_file(full):
            found[name[:-len(".safetensors")]] = full
    order = [t for t in TASKS if t in found] + sorted(t for t in found if t not in TASKS)
    return {t: found[t] for t in order}


def official_scb_config(cfg):
    """scb/config.json as the released ones (derain's key set), for a PluginConfig."""
    return {"_class_name": "SCBNet", "_diffusers_version": "0.17.1", "act_fn": "silu",
            "attention_head_dim": cfg.heads, "block_out_channels": [cfg.channels], "class_embed_type": None,
            "conditioning_embedding_out_channels": [16, 32, 96, 256],
            "controlnet_conditioning_channel_order": "rgb", "cross_attention_dim": cfg.context_dim,
            "down_block_types": ["CrossAttnDownBlock2D"], "downsample_padding": 1, "flip_sin_to_cos": True,
            "freq_shift": 0, "global_pool_conditions": False, "in_channels": cfg.latent_channels,
            "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
            "num_class_embeds": None, "only_cross_attention": False,
            "projection_class_embeddings_input_dim": None, "resnet_time_scale_shift": "default",
            "upcast_attention": False, "use_linear_projection": False}


def export_official_plugin(plugin, folder):
    """Write `plugin` as an official `<task>/` folder (scb/config.json, scb/diffusion_pytorch_model.bin,
    tpb.pt) in `folder`, which must not exist yet; it appears complete or not at all (written under a
    temporary name, then renamed)."""
    folder = os.path.normpath(folder)
    tmp = f"{folder}.tmp{os.getpid()}"
    os.makedirs(os.path.join(tmp, "scb"))
    try:
        with open(os.path.join(tmp, "scb", "config.json"), "w") as f:
            json.dump(official_scb_config(plugin.scb.cfg), f, indent=2, sort_keys=True)
        torch.save(scb_to_diffusers(_cpu_contiguous(plugin.scb.state_dict())),
                   os.path.join(tmp, "scb", "diffusion_pytorch_model.bin"))
        torch.save({"model": _cpu_contiguous(plugin.tpb.state_dict())}, os.path.join(tmp, "tpb.pt"))
        os.replace(tmp, folder)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------
# Plugin-Selector (official modules/prompt.py PromptTunnerModel, visual variant)
# --------------------------------------------------------------------------------------------------------

def load_selector(path, dtype=torch.float32, device="cpu"):
    """The official PromptTunner.pt ({'model': state dict}, keys maybe `module.`-prefixed) or a minidiff
    .safetensors written by save_selector."""
    path = os.fspath(path)
    state_dict = strip_module_prefix(read_state_dict(path))
    if path.endswith(".safetensors") and read_format(path) != SELECTOR_FORMAT:
        raise CheckpointError(f"{path}: no '{SELECTOR_FORMAT}' metadata; not a minidiff selector file")
    if "proj_v.weight" not in state_dict:
        raise CheckpointError(f"{path}: no proj_v.weight; not a Diff-Plugin selector "
                              f"({len(state_dict)} tensors)")
    if "logit_scale" in state_dict:  # accept a [1] scalar as well as a 0-d one
        state_dict["logit_scale"] = state_dict["logit_scale"].reshape(())
    with torch.device("meta"):
        model = PluginSelector(state_dict["proj_v.weight"].shape[0])
    return load_strict(model, state_dict, f"plugin selector ({path})", dtype=dtype, device=device)


def save_selector(selector, path, metadata=None):
    """Write the selector as a minidiff .safetensors (atomically)."""
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    meta["format"] = SELECTOR_FORMAT
    tensors = _cpu_contiguous(selector.state_dict())
    atomic_write(path, lambda tmp: save_sorted(tensors, tmp, meta))


def export_official_selector(selector, path):
    """Write the selector as the official `PromptTunner.pt` ({'model': state dict}), atomically."""
    state_dict = _cpu_contiguous(selector.state_dict())
    atomic_write(path, lambda tmp: torch.save({"model": state_dict}, tmp))
