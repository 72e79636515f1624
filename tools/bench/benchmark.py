#!/usr/bin/env python
"""Benchmark minidiff against diffusers/transformers on the same random SD-1.5 weights, one table.

    python tools/bench/benchmark.py --json bench.json      # all; fp32 (+ bf16 if the CPU has it); ~25 min, 2 cores
    python tools/bench/benchmark.py --quick                # CI-sized: small shapes, one run each (~8 min)
    python tools/bench/benchmark.py --only unet,vae --dtypes fp32 --runs 5
    python tools/bench/benchmark.py --only load --checkpoint checkpoints/v1-5-pruned-emaonly.safetensors
    MINIDIFF_ORACLE_PYTHON=... python tools/bench/benchmark.py --only features   # FID/KID features (not default)

Benchmarks (one function each, registered in BENCHMARKS; `--only a,b` picks some):
  unet     UNet forward, batch 1, latents 64x64 and 32x32 with 77- and 256-token contexts (256: the
           Diff-Plugin visual prompt), warm median; also as a fraction of the machine's GEMM peak in that
           dtype (the network's FLOPs counted by torch.utils.flop_counter on the meta device).
  vae      VAE encode and decode of a 512x512 image, warm median.
  restore  one 20-step Diff-Plugin restore of a 512x512 photo (full-size random CLIP ViT-L/14 vision and
           plugin): minidiff.plugin.plugin.restore against the official loop rebuilt from diffusers + transformers
           (tests/official_oracle.py), on the same weights; wall time and peak RSS above the start.
  train    one Task-Plugin training step (plugin_loss + backward + clip + AdamW), 512x512, batch 1, against
           the official train.py step rebuilt from diffusers + transformers: wall time, the step's peak RSS,
           and a torch.profiler breakdown (regions, op kinds, top ops) printed above the table.
  load     load the whole SD-1.5 single file (text encoder, UNet, VAE) in a fresh process per library and
           repeat: the load call, load + a first read of every weight, the first UNet forward after it
           (64x64, 77 tokens: no warm kernels), and the process's peak RSS.
  features FID/KID feature extraction against clean-fid / pytorch-fid (in MINIDIFF_ORACLE_PYTHON's
           environment); only with --only.
The run goes dtype by dtype (every benchmark in fp32, then in bf16) and rewrites --json after each benchmark,
marked "complete": false until the end: a run cut short keeps what it measured.
Each dtype of --dtypes (default fp32, and bf16 where /proc/cpuinfo shows avx512_bf16 or amx_bf16) gets ONE
process that loads both libraries from the same file and measures unet, vae and restore in it, the libraries
taking turns at every run (A B, then B A, ...): allocator, cache and CPU-frequency state touch both alike, and
warm-up runs go to both before any timed run. train runs both libraries in one process too; load needs fresh
ones. The GEMM peak is the median GFLOP/s of a 4096^3 matmul in each dtype, measured first on the same thread
count. The checkpoint is an SD-1.5 single file (original CompVis names) with random weights, written once
tensor by tensor, or --checkpoint; diffusers loads it fully offline with from_single_file(config=<local
folder>) (SD-1.5 component configs and a tokenizer written from minidiff's vocabulary). Peak memory per
megapixel of the restore is tools/bench/bench_memory.py's job. Without diffusers only minidiff's column is filled
(restore and train need diffusers + transformers).
"""
import argparse
import json
import math
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
from importlib import metadata

# Run from a checkout too (workers are fresh interpreters started on this file); tests/ for the oracle.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for _path in (REPO, os.path.join(REPO, "tools"), os.path.join(REPO, "tests")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

WORKER_FLAG = "--worker"  # internal: `benchmark.py --worker NAME JSON-ARGS` runs one measurement process
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
LIBS = ("minidiff", "diffusers")
# What one run measures at full size and in --quick (CI-sized: the same code paths, small shapes).
PRESETS = {"full": {"unet": [(64, 77), (64, 256), (32, 77), (32, 256)], "vae": 512, "restore": (512, 20),
                    "train": 512, "gemm": 4096, "runs": 3, "warmup": 1, "load_repeats": 2},
           "quick": {"unet": [(32, 77), (32, 256)], "vae": 256, "restore": (256, 2), "train": 128,
                     "gemm": 2048, "runs": 1, "warmup": 1, "load_repeats": 1}}
IN_PROCESS = ("unet", "vae", "restore")  # measured together, one process per dtype


# ------------------------------------------------------------- the machine: CPU, versions, GEMM peak

def cpu_info(text=None):
    """CPU model, logical CPUs and the flags that matter for these kernels, from /proc/cpuinfo."""
    if text is None:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}  # the last CPU's lines win: all alike
    flags = set(fields.get("flags", "").split())
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"model": fields.get("model name", platform.processor() or "?"),
            "logical_cpus": text.count("processor\t:") or os.cpu_count(),
            "flags": {f: f in flags for f in wanted},
            "native_bf16": "avx512_bf16" in flags or "amx_bf16" in flags}


def versions():
    """Versions of the libraries compared, without importing them (None: not installed)."""
    out = {}
    for name in ("torch", "diffusers", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def gemm_gflops(dtype, n, runs=3):
    """Median GFLOP/s of an n x n x n matmul in `dtype` on torch's current thread count (one warm-up)."""
    import torch
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
    torch.mm(a, b)  # warm-up: the kernel's first call packs and dispatches
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / median(times) / 1e9


def median(values):
    """The middle value (the upper one of an even count): a run that was really measured."""
    return sorted(values)[len(values) // 2]


def alternate(fns, runs, warmup):
    """Time each library's zero-argument callable in turns: all warm-ups first (A B A B ...), then `runs`
    timed rounds, the first to go alternating (A B, B A, ...). fns: {lib: fn} -> ({lib: [wall seconds]},
    {lib: [CPU seconds of all threads: steadier than wall on a busy machine]}, {lib: its last output})."""
    libs = list(fns)
    for _ in range(warmup):
        for lib in libs:
            fns[lib]()
    wall, cpu, last = {lib: [] for lib in libs}, {lib: [] for lib in libs}, {}
    for i in range(runs):
        for lib in (libs if i % 2 == 0 else libs[::-1]):
            t, c = time.perf_counter(), time.process_time()
            last[lib] = fns[lib]()
            wall[lib].append(time.perf_counter() - t)
            cpu[lib].append(time.process_time() - c)
    return wall, cpu, last


def _status_mb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def _reset_peak_mb():
    """Hand freed memory back to the OS (glibc malloc_trim) and restart the kernel's peak-RSS mark (VmHWM)
    at the current RSS, so the next peak is this step's own; returns that RSS (MiB)."""
    import ctypes
    import gc
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


# ------------------------------------------------------------- shared: random checkpoint, diffusers configs

# Non-weight buffers that the original LatentDiffusion single file also carries (loaders must ignore them).
SCHEDULE_BUFFERS = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"]


def write_random_sd15(path, seed=0):
    """Write an SD-1.5 single file (original names, fp32) with random weights, one tensor at a time."""
    import torch
    from minidiff.models.clip import CLIP_TEXT_L14, CLIPTextModel
    from minidiff.models.unet import UNet, UNetConfig
    from minidiff.models.vae import AutoencoderKL, VAEConfig
    with torch.device("meta"):  # shapes only, no memory
        parts = {"model.diffusion_model.": UNet(UNetConfig()),
                 "first_stage_model.": AutoencoderKL(VAEConfig()),
                 "cond_stage_model.transformer.": CLIPTextModel(CLIP_TEXT_L14)}
    specs = {p + k: (tuple(v.shape), torch.float32)
             for p, m in parts.items() for k, v in m.state_dict().items()}
    specs["cond_stage_model.transformer.text_model.embeddings.position_ids"] = ((1, 77), torch.int64)
    specs.update({name: ((1000,), torch.float32) for name in SCHEDULE_BUFFERS})
    header, offset = {"__metadata__": {"format": "pt", "note": "minidiff benchmark: random weights"}}, 0
    for key, (shape, dtype) in specs.items():
        size = math.prod(shape) * (8 if dtype == torch.int64 else 4)
        header[key] = {"dtype": "I64" if dtype == torch.int64 else "F32", "shape": list(shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8 bytes
    gen = torch.Generator().manual_seed(seed)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for key, (shape, dtype) in specs.items():
            if dtype == torch.int64:
                t = torch.arange(77)[None]  # position ids
            elif key in SCHEDULE_BUFFERS:
                t = torch.linspace(0.999, 0.005, 1000)  # placeholder values: only the shapes matter
            elif len(shape) >= 2:  # conv / linear / embedding: variance-preserving random init
                t = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
            elif key.endswith("weight"):  # norm scales
                t = 1 + 0.1 * torch.randn(shape, generator=gen)
            else:  # biases
                t = 0.02 * torch.randn(shape, generator=gen)
            f.write(t.contiguous().numpy().tobytes())
    os.replace(path + ".tmp", path)


def write_diffusers_config(root):
    """The SD-1.5 pipeline config folder diffusers' single-file loader needs offline (no weights in it)."""
    from minidiff.models.tokenizer import CLIPTokenizer, read_merges
    down = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    files = {
        "model_index.json": {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.35.2",
                             "feature_extractor": [None, None], "safety_checker": [None, None],
                             "requires_safety_checker": False, "scheduler": ["diffusers", "PNDMScheduler"],
                             "text_encoder": ["transformers", "CLIPTextModel"],
                             "tokenizer": ["transformers", "CLIPTokenizer"],
                             "unet": ["diffusers", "UNet2DConditionModel"],
                             "vae": ["diffusers", "AutoencoderKL"]},
        "unet/config.json": {"_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4,
                             "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280],
                             "down_block_types": down, "up_block_types": up, "layers_per_block": 2,
                             "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32},
        "vae/config.json": {"_class_name": "AutoencoderKL", "sample_size": 512, "in_channels": 3,
                            "out_channels": 3, "block_out_channels": [128, 256, 512, 512],
                            "layers_per_block": 2, "down_block_types": ["DownEncoderBlock2D"] * 4,
                            "up_block_types": ["UpDecoderBlock2D"] * 4, "latent_channels": 4,
                            "norm_num_groups": 32, "scaling_factor": 0.18215},
        "text_encoder/config.json": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                                     "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
                                     "num_hidden_layers": 12, "num_attention_heads": 12,
                                     "projection_dim": 768, "max_position_embeddings": 77,
                                     "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
                                     "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
        "scheduler/scheduler_config.json": {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000,
                                            "beta_start": 0.00085, "beta_end": 0.012,
                                            "beta_schedule": "scaled_linear", "set_alpha_to_one": False,
                                            "skip_prk_steps": True, "steps_offset": 1},
        "tokenizer/vocab.json": CLIPTokenizer().encoder,
    }
    for name, content in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, name)) or root, exist_ok=True)
        with open(os.path.join(root, name), "w", encoding="utf-8") as f:
            json.dump(content, f)
    with open(os.path.join(root, "tokenizer/merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in read_merges()))


class Context:
    """What the benchmarks share: arguments, preset, dtypes, the temp dir, the checkpoint written on first
    use, and the one in-process comparison per dtype (run on first use, for every IN_PROCESS part chosen)."""

    def __init__(self, args, preset, chosen, tmp):
        self.args, self.preset, self.chosen, self.tmp = args, preset, chosen, tmp
        self._ckpt, self._config, self._compared, self.failed = args.checkpoint, None, {}, []
        self.libs = [lib for lib in LIBS if lib == "minidiff" or versions()["diffusers"]]

    def checkpoint(self):
        if self._ckpt is None:
            self._ckpt = os.path.join(self.tmp, "sd15-random.safetensors")
            t = time.perf_counter()
            write_random_sd15(self._ckpt, self.args.seed)
            gib = os.path.getsize(self._ckpt) / 2**30
            print(f"wrote random SD-1.5 checkpoint {self._ckpt} ({gib:.2f} GiB, "
                  f"{time.perf_counter() - t:.0f} s)", flush=True)
        return self._ckpt

    def diffusers_config(self):
        if self._config is None:
            self._config = os.path.join(self.tmp, "diffusers-config")
            write_diffusers_config(self._config)
        return self._config

    def compare(self, dtype):
        """unet / vae / restore figures in `dtype`, from one worker process that holds both libraries; None
        when that process failed (reported once, in self.failed: the other dtype's rows still count)."""
        if dtype not in self._compared:
            p = self.preset
            try:
                self._compared[dtype] = self.run(
                    "compare", dtype=dtype, libs=self.libs, parts=[b for b in IN_PROCESS if b in self.chosen],
                    ckpt=self.checkpoint(), config=self.diffusers_config(), unet=p["unet"], vae=p["vae"],
                    restore=p["restore"], runs=self.args.runs, warmup=self.args.warmup,
                    restore_runs=self.args.restore_runs, seed=self.args.seed)
            except RuntimeError as e:
                self._compared[dtype] = None
                self.failed.append(f"benchmark: {', '.join(IN_PROCESS)} in {dtype}: {e}")
                print(self.failed[-1], file=sys.stderr, flush=True)
        return self._compared[dtype]

    def run(self, worker, **kw):
        """Run one worker in a fresh interpreter (its progress lines go straight to the terminal); return the
        dict it wrote as JSON."""
        kw.update(threads=self.args.threads, tmp=self.tmp,
                  out=os.path.join(self.tmp, f"{worker}-result.json"))
        python = kw.pop("python", None) or sys.executable  # features: reference side in the oracle env
        cmd = [python, os.path.abspath(__file__), WORKER_FLAG, worker, json.dumps(kw)]
        proc = subprocess.run(cmd, timeout=3 * 3600)
        if proc.returncode != 0:  # the worker printed its error (one line for a CheckpointError)
            raise RuntimeError(f"the {worker} worker ({kw.get('lib') or kw.get('dtype')}) exited with "
                               f"{proc.returncode}")
        with open(kw["out"]) as f:
            return json.load(f)


# ------------------------------------------------------------- in one process: unet, vae, restore

def load_pair(kw, dtype):
    """Both libraries' networks from the same single file in `dtype` -> {lib: {name: network}}. minidiff's
    UNet and VAE get their 3x3 conv kernels packed once for oneDNN, as the tools do for CPU inference."""
    import minidiff
    from minidiff.models.prepack import prepack_convs
    sd = minidiff.load_stable_diffusion(kw["ckpt"], dtype=dtype)
    prepack_convs(sd.unet)
    prepack_convs(sd.vae)
    nets = {"minidiff": {"sd": sd}}
    if "diffusers" in kw["libs"]:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        opts = dict(config=kw["config"], local_files_only=True, torch_dtype=dtype)
        nets["diffusers"] = {
            "unet": UNet2DConditionModel.from_single_file(kw["ckpt"], subfolder="unet", **opts).eval(),
            "vae": AutoencoderKL.from_single_file(kw["ckpt"], subfolder="vae", **opts).eval()}
    return nets


def unet_flops(cfg, size, tokens):
    """FLOPs of one UNet forward (batch 1), counted on the meta device: no memory, no time."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from minidiff.models.unet import UNet
    with torch.device("meta"):
        unet = UNet(cfg)
        x, context = torch.empty(1, 4, size, size), torch.empty(1, tokens, cfg.context_dim)
        with FlopCounterMode(display=False) as counter:
            unet(x, torch.tensor([500]), context)
    return counter.get_total_flops()


def measure_unet(nets, kw, dtype):
    """Warm median of one UNet forward per (latent size, context tokens), the libraries in turns."""
    import torch
    out = {}
    sd = nets["minidiff"]["sd"]
    for size, tokens in kw["unet"]:
        g = torch.Generator().manual_seed(kw["seed"])
        x = torch.randn(1, 4, size, size, generator=g).to(dtype)  # latents [1, 4, s, s]
        context = torch.randn(1, tokens, sd.unet.cfg.context_dim, generator=g).to(dtype)  # [1, n, 768]
        t = torch.tensor([500])
        fns = {"minidiff": lambda: sd.unet(x, t, context)}
        if "diffusers" in nets:
            ref = nets["diffusers"]["unet"]
            fns["diffusers"] = lambda: ref(x, t, encoder_hidden_states=context).sample
        r, cpu, last = alternate(fns, kw["runs"], kw["warmup"])
        out[f"{size}x{tokens}"] = {"size": size, "tokens": tokens, "times_s": r, "cpu_s": cpu,
                                   "flops": unet_flops(sd.unet.cfg, size, tokens),
                                   "max_diff": _max_diff(last)}
        print(f"  unet {size}x{size}/{tokens} {kw['dtype']}: {_medians(r)} (CPU {_medians(cpu)}); "
              f"max|eps diff| {out[f'{size}x{tokens}']['max_diff']}", flush=True)
    return out


def measure_vae(nets, kw, dtype):
    """Warm medians of VAE encode (to the posterior mean) and decode at kw["vae"] pixels square."""
    import torch
    import torch.nn.functional as F
    s, vae = kw["vae"], nets["minidiff"]["sd"].vae
    g = torch.Generator().manual_seed(kw["seed"])
    image = F.interpolate(torch.rand(1, 3, s // 16, s // 16, generator=g) * 2 - 1, size=(s, s),
                          mode="bicubic").clamp(-1, 1).to(dtype)  # a smooth photo-alike [1, 3, s, s]
    z = torch.randn(1, 4, s // 8, s // 8, generator=g).to(dtype)  # unscaled latents [1, 4, s/8, s/8]
    parts = {"encode": {"minidiff": lambda: vae.encode(image)[0]},
             "decode": {"minidiff": lambda: vae.decode(z)}}
    if "diffusers" in nets:
        ref = nets["diffusers"]["vae"]
        parts["encode"]["diffusers"] = lambda: ref.encode(image).latent_dist.mode()
        parts["decode"]["diffusers"] = lambda: ref.decode(z).sample
    out = {}
    for name, fns in parts.items():
        r, cpu, last = alternate(fns, kw["runs"], kw["warmup"])
        out[name] = {"size": s, "times_s": r, "cpu_s": cpu, "max_diff": _max_diff(last)}
        print(f"  vae {name} {s}x{s} {kw['dtype']}: {_medians(r)} (CPU {_medians(cpu)}); max|diff| "
              f"{out[name]['max_diff']}", flush=True)
    return out


def restore_models(nets, kw, dtype):
    """Full-size random CLIP ViT-L/14 vision and one derain plugin per library, the SAME weight tensors
    (minidiff's built from the reference's state dicts through weights.py's renames, no copy)."""
    from dataclasses import replace
    import torch
    from minidiff.models.clip import CLIP_VISION_L14, CLIPVisionModel
    from minidiff.plugin.plugin import SCB, TPB, TaskPlugin
    from minidiff.plugin.files import build_plugin
    from minidiff.models.prepack import prepack_convs
    from minidiff.io.weights import CLIP_IGNORED, load_strict, scb_from_diffusers
    torch.manual_seed(kw["seed"] + 2)
    if "diffusers" not in nets:  # minidiff alone: its own random init
        nets["minidiff"].update(clip=CLIPVisionModel(CLIP_VISION_L14).to(dtype).eval(),
                                plugin=TaskPlugin("derain", TPB(), SCB()).to(dtype).eval())
        return
    import official_oracle as oracle
    from transformers import CLIPVisionConfig, CLIPVisionModel as RefCLIP
    clip = RefCLIP(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                    num_attention_heads=16, patch_size=14, hidden_act="quick_gelu"))
    tpb, scb = oracle.RefTPB(1024, 768), oracle.RefSCB(320, 8, 768)  # the official sizes, default init
    clip, tpb, scb = (m.to(dtype).eval() for m in (clip, tpb, scb))
    with torch.device("meta"):
        mini_clip = CLIPVisionModel(replace(CLIP_VISION_L14, projection=None))  # CLIPVisionModel: none
    plugin = build_plugin("derain", tpb.state_dict(), scb_from_diffusers(scb.state_dict()), 8)
    prepack_convs(plugin.scb)  # as for the UNet and VAE (load_pair)
    clip_mini = load_strict(mini_clip, clip.state_dict(), "CLIP vision", ignore=CLIP_IGNORED).eval()
    nets["minidiff"].update(clip=clip_mini, plugin=plugin)
    nets["diffusers"].update(clip=clip, plugin=("derain", tpb, scb))


def _cast_inputs(module, dtype):
    """Cast a module's floating-point inputs to `dtype` at its door, as infer.py does with weight_dtype (the
    oracle loop is written for fp32: its pixels, noise and zero mid residual are fp32 tensors) -> the hook's
    handle."""
    import torch

    def cast(v):  # the SCB's residuals come as a list, padded with fp32 zeros
        if isinstance(v, (list, tuple)):
            return type(v)(map(cast, v))
        return v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
    return module.register_forward_pre_hook(
        lambda m, args, kwargs: (tuple(map(cast, args)), {k: cast(v) for k, v in kwargs.items()}),
        with_kwargs=True)


def measure_restore(nets, kw, dtype):
    """Wall time and peak RSS above the start of one Diff-Plugin restore (UniPC, kw steps), in turns."""
    import numpy as np
    from PIL import Image
    from minidiff.plugin.plugin import restore
    size, steps = kw["restore"]
    rng = np.random.default_rng(kw["seed"])
    photo = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).resize((size, size))
    m = nets["minidiff"]
    fns = {"minidiff": lambda: restore(m["sd"], m["clip"], [m["plugin"]], photo, steps=steps,
                                       clip_image=photo, progress=False)}
    hooks = []
    if "diffusers" in nets:
        import official_oracle as oracle
        d = nets["diffusers"]
        fns["diffusers"] = lambda: oracle.official_restore(d["unet"], d["vae"], d["clip"], [d["plugin"]],
                                                           photo, photo, steps=steps)
        hooks = [_cast_inputs(m, dtype) for m in (d["clip"], d["vae"].encoder, d["vae"].post_quant_conv,
                                                   d["unet"], d["plugin"][2])]
    times, peaks, images = {lib: [] for lib in fns}, {lib: [] for lib in fns}, {}
    for i in range(kw["restore_runs"]):  # no warm-up: the unet and vae parts ran these shapes before
        for lib in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
            base = _reset_peak_mb()
            t = time.perf_counter()
            images[lib] = np.asarray(fns[lib](), dtype=np.int16)
            times[lib].append(time.perf_counter() - t)
            peaks[lib].append(_status_mb("VmHWM") - base)
    for h in hooks:
        h.remove()
    diff = int(np.abs(images["minidiff"] - images["diffusers"]).max()) if len(images) == 2 else None
    print(f"  restore {size}x{size}, {steps} steps: {_medians(times)}; max pixel diff {diff}", flush=True)
    return {"size": size, "steps": steps, "times_s": times, "peak_above_start_mb": peaks,
            "max_pixel_diff": diff}


def _max_diff(outputs):
    """max |minidiff - diffusers| of the two outputs (same weights and inputs: a sanity check)."""
    if len(outputs) < 2:
        return None
    return (outputs["minidiff"].float() - outputs["diffusers"].float()).abs().max().item()


def _medians(times):
    return ", ".join(f"{lib} {median(t):.3f} s" for lib, t in times.items())


MEASURES = {"unet": measure_unet, "vae": measure_vae, "restore": measure_restore}


def worker_compare(kw):
    """Load both libraries in kw["dtype"] from the same file, then measure kw["parts"] in this process."""
    import torch
    dtype = getattr(torch, DTYPES[kw["dtype"]])
    t = time.perf_counter()
    nets = load_pair(kw, dtype)
    if "restore" in kw["parts"]:
        restore_models(nets, kw, dtype)
    print(f"[{kw['dtype']}] networks ready ({time.perf_counter() - t:.0f} s, "
          f"{torch.get_num_threads()} threads)", flush=True)
    out = {}
    with torch.inference_mode():
        for part in kw["parts"]:
            out[part] = MEASURES[part](nets, kw, dtype)
    out["process_peak_rss_mb"] = _status_mb("VmHWM")  # no reset before: the peak of the whole process
    return out


def worker_load(kw):
    """Load the whole pipeline from the single file in a fresh process: time, first read of every weight,
    first UNet forward (64x64 latents, 77 tokens: kernels not warm), peak RSS."""
    import torch
    dtype = getattr(torch, DTYPES[kw["dtype"]])
    if kw["lib"] == "minidiff":
        import minidiff
        load = lambda: minidiff.load_stable_diffusion(kw["ckpt"], dtype=dtype)  # noqa: E731
    else:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import logging
        logging.disable_progress_bar()
        load = lambda: StableDiffusionPipeline.from_single_file(  # noqa: E731
            kw["ckpt"], config=kw["config"], local_files_only=True, torch_dtype=dtype,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    base = _status_mb("VmRSS")
    t = time.perf_counter()
    pipe = load()
    seconds = time.perf_counter() - t
    # Both libraries may leave weights as lazily read (memory-mapped) pages that are only read at first use:
    # read every value of every tensor: a float64 sum per tensor over its dims in memory order (a view: no
    # copy, the same speed for minidiff's channels-last kernels as for contiguous ones).
    parts = vars(pipe).values() if kw["lib"] == "minidiff" else pipe.components.values()
    modules = [m for m in parts if isinstance(m, torch.nn.Module)]
    tensors = [v for m in modules for v in m.state_dict().values()]
    in_memory_order = lambda v: v.permute(*sorted(range(v.dim()), key=lambda d: -v.stride(d)))  # noqa: E731
    checksum = sum(float(in_memory_order(v).sum(dtype=torch.float64)) for v in tensors)
    ready = time.perf_counter() - t
    counts = {"modules": len(modules), "tensors": len(tensors)}
    del tensors, modules  # else they keep minidiff's plain kernels alive beside the packed ones below
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 64, 64, generator=g).to(dtype)  # latents [1, 4, 64, 64]
    context = torch.randn(1, 77, 768, generator=g).to(dtype)  # text hidden states [1, 77, 768]
    with torch.inference_mode():
        t = time.perf_counter()
        if kw["lib"] == "minidiff":  # what the tools run on the CPU: kernels packed once, then the forward
            from minidiff.models.prepack import prepack_convs
            prepack_convs(pipe.unet)
            pipe.unet(x, torch.tensor([500]), context)
        else:
            pipe.unet(x, torch.tensor([500]), encoder_hidden_states=context)
        first = time.perf_counter() - t
    return {"seconds": seconds, "ready_seconds": ready, "first_forward_s": first,
            "peak_rss_mb": _status_mb("VmHWM"), "import_rss_mb": base, **counts, "checksum": checksum}


WORKERS = {"compare": worker_compare, "load": worker_load}


# ------------------------------------------------------------- benchmarks: rows of the table

def row(bench, figure, values, unit="s", dtype=None, flops=None):
    """One table row: {lib: value} (None where a library was not measured); flops only for UNet rows."""
    return {"bench": bench, "figure": figure, "unit": unit, "dtype": dtype, "flops": flops,
            **{lib: values.get(lib) for lib in LIBS}}


def bench_unet(ctx, dtype):
    if ctx.compare(dtype) is None:
        return [], None
    r = ctx.compare(dtype)["unet"]
    rows = [row("unet", f"UNet forward {m['size']}x{m['size']} latents, {m['tokens']} tokens, {dtype}, warm "
                "median (s)", _med(m["times_s"]), dtype=dtype, flops=m["flops"]) for m in r.values()]
    return rows, r


def bench_vae(ctx, dtype):
    if ctx.compare(dtype) is None:
        return [], None
    r = ctx.compare(dtype)["vae"]
    rows = [row("vae", f"VAE {name} {m['size']}x{m['size']}, {dtype}, warm median (s)", _med(m["times_s"]),
                dtype=dtype) for name, m in r.items()]
    return rows, r


def bench_restore(ctx, dtype):
    if ctx.compare(dtype) is None:
        return [], None
    m = ctx.compare(dtype)["restore"]
    what = f"Diff-Plugin restore {m['size']}x{m['size']}, {m['steps']} steps, {dtype}"
    rows = [row("restore", f"{what} (s)", _med(m["times_s"]), dtype=dtype),
            row("restore", f"{what}, peak RSS above start (MiB)",
                {lib: max(v) for lib, v in m["peak_above_start_mb"].items()}, unit="MiB", dtype=dtype)]
    return rows, m


def bench_load(ctx, dtype):
    from minidiff.models.unet import UNetConfig
    runs = {lib: [] for lib in ctx.libs}
    for _ in range(ctx.args.load_repeats):  # alternate the libraries so both see a warm page cache
        for lib in runs:
            runs[lib].append(ctx.run("load", lib=lib, dtype=dtype, ckpt=ctx.checkpoint(),
                                     config=ctx.diffusers_config()))
    best = lambda key: {lib: min(r[key] for r in rs) for lib, rs in runs.items()}  # noqa: E731
    print(f"load {dtype}: sum of every weight value "
          f"{ {lib: rs[0]['checksum'] for lib, rs in runs.items()} } (equal up to float64 rounding: the same weights)")
    rows = [row("load", f"load SD-1.5 single file, {dtype}, best (s)", best("seconds"), dtype=dtype),
            row("load", f"load + read every weight, {dtype}, best (s)", best("ready_seconds"), dtype=dtype),
            row("load", f"UNet first forward 64x64, 77 tokens, {dtype}, fresh process (s; minidiff: with "
                "prepack_convs)", best("first_forward_s"), dtype=dtype, flops=unet_flops(UNetConfig(), 64, 77)),
            row("load", f"peak RSS: load + first forward, {dtype} (MiB)",
                {lib: max(r["peak_rss_mb"] for r in rs) for lib, rs in runs.items()}, unit="MiB", dtype=dtype)]
    return rows, runs


def _med(times):
    return {lib: median(t) for lib, t in times.items()}


# ------------------------------------------------------------- features: FID/KID feature extraction

def write_feature_images(folder, n, seed=0):
    """n smooth random 512x384 PNG photos-alike (upsampled noise), the same files for every library."""
    import numpy as np
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8))
        small.resize((512, 384), Image.BICUBIC).save(os.path.join(folder, f"{i:04d}.png"))
    return folder


def worker_features(kw):
    """Feature extraction of a folder: minidiff (tools/evaluate.py's path) or the reference library
    (clean-fid's CLIP path; pytorch-fid's get_activations for Inception), random weights, one warm-up batch
    first, then the whole folder timed (reading, resizing and the network)."""
    import glob
    import torch
    files = sorted(glob.glob(os.path.join(kw["images"], "*.png")))
    bs, feature = kw["batch"], kw["feature"]
    torch.manual_seed(0)
    if kw["lib"] == "minidiff":
        from minidiff.eval import metrics
        from minidiff.models.clip import CLIP_VISION_B32, CLIPVisionModel
        from minidiff.eval.inception import FIDInception, inception_pixels
        if feature == "clip_vit_b_32":
            model = CLIPVisionModel(CLIP_VISION_B32).eval()
            ex = metrics.FeatureExtractor(feature, model, metrics.clip_pixels)
        else:
            ex = metrics.FeatureExtractor(feature, FIDInception().eval(), inception_pixels)
        run = lambda fs: metrics.files_features(fs, ex, bs, progress=False)  # noqa: E731
    elif feature == "clip_vit_b_32":  # oracle env: clean-fid with OpenAI's model class rebuilt by open_clip
        import types
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
        model = CLIP(512, CLIPVisionCfg(layers=12, width=768, patch_size=32, image_size=224),
                     CLIPTextCfg(context_length=77, vocab_size=49408, width=512, heads=8, layers=12),
                     quick_gelu=True).float().eval()
        sys.modules["clip"] = types.SimpleNamespace(load=lambda *a, **k: (model, None))  # openai `clip`
        from cleanfid.clip_features import CLIP_fx, img_preprocess_clip
        from cleanfid.fid import get_files_features
        fx = CLIP_fx("ViT-B/32", device="cpu")
        run = lambda fs: get_files_features(fs, fx, num_workers=0, batch_size=bs,  # noqa: E731
                                            device=torch.device("cpu"), custom_fn_resize=img_preprocess_clip,
                                            verbose=False)
    else:  # oracle env: pytorch-fid's InceptionV3 with its weights download replaced by random weights
        import torchvision
        from pytorch_fid import fid_score, inception
        net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                              init_weights=False)
        inception.load_state_dict_from_url = lambda *a, **k: net.state_dict()
        model = inception.InceptionV3([3]).eval()
        fid_score.tqdm = lambda x, **k: x  # no progress bar
        run = lambda fs: fid_score.get_activations(fs, model, bs, device="cpu", num_workers=0)  # noqa: E731
    with torch.inference_mode():
        run(files[:bs])  # warm-up batch
        t = time.perf_counter()
        feats = run(files)
        seconds = time.perf_counter() - t
    return {"seconds": seconds, "images": len(files), "images_per_s": len(files) / seconds,
            "shape": list(feats.shape), "threads": torch.get_num_threads()}


def bench_features(ctx, dtype):
    """Images/s of FID/KID feature extraction: minidiff vs clean-fid (CLIP) / pytorch-fid (Inception), fp32
    whatever `dtype` (run once, with the first dtype)."""
    a = ctx.args
    images = write_feature_images(os.path.join(ctx.tmp, "feature-images"), a.feature_images)
    oracle = os.environ.get("MINIDIFF_ORACLE_PYTHON")
    rows, res = [], {}
    for feature, ref in (("clip_vit_b_32", "clean-fid"), ("inception", "pytorch-fid")):
        kw = dict(feature=feature, images=images, batch=a.feature_batch)
        libs = {"minidiff": None}
        if oracle and os.path.exists(oracle):  # the reference libraries live in the oracle environment
            libs[ref] = oracle
        runs = {lib: [] for lib in libs}
        for _ in range(a.rounds):  # libraries alternate; the best round counts (machine load only slows)
            for lib, python in libs.items():
                runs[lib].append(ctx.run("features", lib=lib, python=python, **kw))
        r = res[feature] = {lib: max(rs, key=lambda x: x["images_per_s"]) for lib, rs in runs.items()}
        print(f"features: {feature} images/s minidiff {r['minidiff']['images_per_s']:.2f}, {ref} "
              + (f"{r[ref]['images_per_s']:.2f}" if ref in r else "n/a (MINIDIFF_ORACLE_PYTHON unset)")
              + f" ({a.feature_images} images 512x384, batch {a.feature_batch}, "
                f"{r['minidiff']['threads']} threads)")
        rows.append(row("features", f"{feature} features, s/image (diffusers column: {ref})",
                        {"minidiff": 1 / r["minidiff"]["images_per_s"],
                         "diffusers": 1 / r[ref]["images_per_s"] if ref in r else None}))
    return rows, res


# ------------------------------------------------------------- train: one Task-Plugin training step

# op-name fragments -> category, first match wins (self CPU time of aten ops, forward and backward)
OP_KINDS = (("attention", ("scaled_dot_product", "flash_attention", "softmax", "baddbmm", "bmm")),
            ("convolution", ("conv",)), ("matmul", ("addmm", "aten::mm", "matmul", "linear")),
            ("norm", ("group_norm", "layer_norm")))


def _train_reference(seed):
    """Full-size random diffusers UNet/VAE and transformers CLIP ViT-L/14 (frozen, fp32), as make_full_models
    builds them for the parity test, without the files."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)  # SD 1.x sizes
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                            num_attention_heads=16, patch_size=14, hidden_act="quick_gelu"))
    # train.py l.161-162 freezes VAE and UNet; CLIP too here: the official code computes CLIP's weight
    # gradients and throws them away, which minidiff deliberately skips (issue 8): timed, it is not the
    # same step, so both sides skip it
    return {"unet": unet.eval().requires_grad_(False), "vae": vae.eval().requires_grad_(False),
            "clip": clip.eval().requires_grad_(False)}


def _train_pair(ref, seed):
    """The two libraries' step functions on the SAME frozen weight tensors (minidiff's UNet/VAE/CLIP are
    built from the reference's state dicts through weights.py's rename tables, which do not copy) and equal
    but separate plugins (fp32 master weights, one AdamW each, lr 1e-5). -> {lib: (forward, update, objs)}"""
    from dataclasses import replace
    import torch
    import official_oracle as oracle
    from minidiff.models.clip import CLIP_VISION_L14, CLIPVisionModel
    from minidiff.io.loading import StableDiffusion, build_unet, build_vae
    from minidiff.plugin.files import build_plugin
    from minidiff.train.training import clip_and_step, make_optimizer, plugin_loss
    from minidiff.io.weights import CLIP_IGNORED, load_strict, scb_from_diffusers
    with torch.device("meta"):
        clip = CLIPVisionModel(replace(CLIP_VISION_L14, projection=None))  # CLIPVisionModel: no projection
    clip = load_strict(clip, ref["clip"].state_dict(), "CLIP vision", ignore=CLIP_IGNORED)
    sd = StableDiffusion(None, None, build_unet(ref["unet"].state_dict()), build_vae(ref["vae"].state_dict()))
    torch.manual_seed(seed + 1)
    tpb, scb = oracle.RefTPB(1024, 768), oracle.RefSCB(320, 8, 768)  # official sizes, default init
    clone = lambda d: {k: v.clone() for k, v in d.items()}  # noqa: E731
    plugin = build_plugin("derain", clone(tpb.state_dict()), clone(scb_from_diffusers(scb.state_dict())), 8)
    plugin.train().requires_grad_(True)  # as tools/train.py prepares it; the official nets: train.py l.163
    tpb.train()
    scb.train()
    opt_mini, opt_ref = make_optimizer(plugin, 1e-5), oracle.official_optimizer(scb, tpb, 1e-5)
    return sd, clip, plugin, tpb, scb, {
        "minidiff": (lambda b: plugin_loss(sd, clip, plugin, b["degraded"], b["clean"], noise=b["noise"],
                                           timesteps=b["t"], latent_noise=b["latent_noise"]),
                     lambda: clip_and_step(plugin, opt_mini)),
        "diffusers": (lambda b: oracle.official_training_loss(
                          ref["vae"], ref["unet"], ref["clip"], tpb, scb, b["clean"], b["degraded"],
                          b["noise"], b["t"], torch.Generator().manual_seed(1)),  # draws latent_noise
                      lambda: oracle.official_update(scb, tpb, opt_ref))}


def _train_profile(step, modules):
    """One profiled step: time per labelled region (forward parts, backward, optimizer) and self CPU time
    per op category and for the top ops (ms)."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile
    open_regions, hooks = {}, []
    for name, m in modules.items():
        def pre(mod, args, name=name):
            open_regions[name] = record_function(name).__enter__()

        def post(mod, args, out, name=name):
            open_regions.pop(name).__exit__(None, None, None)
        hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    for h in hooks:
        h.remove()
    events = prof.key_averages()
    labels = set(modules) | {"forward", "backward", "optimizer"}
    regions = {e.key: e.cpu_time_total / 1e3 for e in events if e.key in labels}
    ops = sorted((e for e in events if e.key not in labels), key=lambda e: -e.self_cpu_time_total)
    kinds = {}
    for e in ops:
        kind = next((k for k, frags in OP_KINDS if any(f in e.key for f in frags)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + e.self_cpu_time_total / 1e3
    return {"regions_ms": regions, "kinds_ms": kinds,
            "top_ops_ms": {e.key: e.self_cpu_time_total / 1e3 for e in ops[:8]}}


def _train_step(libs, batch, lib):
    """One step of library `lib`: loss, backward, clip + AdamW (each labelled for the profiler) -> loss."""
    from torch.autograd.profiler import record_function
    forward, update = libs[lib]
    with record_function("forward"):
        loss = forward(batch)
    with record_function("backward"):
        loss.backward()
    with record_function("optimizer"):
        update()
    return loss.item()


def worker_train(kw):
    """One training step (loss + backward + clip + AdamW) per library, alternating in this one process on
    the same frozen weights: warm-up steps, then kw["steps"] timed each (the libraries take turns, the first
    to go alternating), peak RSS above the pre-step RSS per step, then one profiled step each."""
    import functools
    import torch
    import torch.nn.functional as F
    ref, out = _train_reference(kw["seed"]), {}
    size, lat = kw["size"], kw["size"] // 8
    g = torch.Generator().manual_seed(kw["seed"])
    photos = [F.interpolate(torch.rand(1, 3, size // 32, size // 32, generator=g) * 2 - 1, size=(size, size),
                            mode="bicubic", align_corners=False).clamp(-1, 1) for _ in range(2)]
    batch = {"degraded": photos[0], "clean": photos[1], "noise": torch.randn(1, 4, lat, lat, generator=g),
             "t": torch.tensor([500]), "latent_noise": torch.randn(1, 4, lat, lat,
                                                                 generator=torch.Generator().manual_seed(1))}
    for name in sorted(kw["dtypes"], key=list(DTYPES).index):  # fp32 first: cast down, never up
        dtype = getattr(torch, DTYPES[name])
        for m in ref.values():
            m.to(dtype)
        sd, clip, plugin, tpb, scb, libs = _train_pair(ref, kw["seed"])
        step = functools.partial(_train_step, libs, batch)
        # warm-up in turns too: oneDNN builds its kernels on first use, bf16 ones for several seconds each
        res = {lib: {"warmup_loss": [], "times_s": [], "cpu_s": [], "step_peak_mb": []} for lib in libs}
        for _ in range(kw["warmup"]):
            for lib in libs:
                res[lib]["warmup_loss"].append(step(lib))
        for i in range(kw["steps"]):
            for lib in (list(libs) if i % 2 == 0 else list(libs)[::-1]):
                base = _reset_peak_mb()
                t, cpu = time.perf_counter(), time.process_time()
                step(lib)
                res[lib]["times_s"].append(time.perf_counter() - t)
                res[lib]["cpu_s"].append(time.process_time() - cpu)  # all threads: steadier on a busy host
                res[lib]["step_peak_mb"].append(_status_mb("VmHWM") - base)
        mods = {"minidiff": {"vae.encoder": sd.vae.encoder, "clip": clip, "tpb": plugin.tpb,
                             "scb": plugin.scb, "unet": sd.unet},
                "diffusers": {"vae.encoder": ref["vae"].encoder, "clip": ref["clip"], "tpb": tpb, "scb": scb,
                              "unet": ref["unet"]}}
        for lib, r in res.items():
            r["median_s"], r["median_cpu_s"] = (sorted(r[k])[len(r[k]) // 2] for k in ("times_s", "cpu_s"))
            r["images_per_s"] = 1 / r["median_s"]  # batch 1
            if kw["profile"]:
                r["profile"] = _train_profile(functools.partial(step, lib), mods[lib])
        frozen = [sd.unet, sd.vae, clip]
        res["frozen_weights_mb"] = sum(p.numel() * p.element_size() for m in frozen
                                       for p in m.parameters()) / 2**20
        out[name] = res
        del sd, clip, plugin, tpb, scb, libs, mods, frozen, step
    out["threads"], out["process_peak_rss_mb"] = torch.get_num_threads(), _status_mb("VmHWM")
    return out


def bench_train(ctx, dtype):
    """One Task-Plugin training step, minidiff vs the official step rebuilt from diffusers + transformers,
    alternating in one process on the same frozen weights; a profile of where the time goes."""
    a = ctx.args
    if "diffusers" not in ctx.libs:
        raise RuntimeError("the train benchmark needs diffusers + transformers (the reference step)")
    size = ctx.preset["train"]
    r = ctx.run("train", size=size, dtypes=[dtype], steps=a.train_steps, warmup=a.train_warmup,
                profile=not a.no_train_profile, seed=a.seed)
    m, d = r[dtype]["minidiff"], r[dtype]["diffusers"]
    print(f"train {dtype}: first loss {m['warmup_loss'][0]:.6f} / {d['warmup_loss'][0]:.6f} (same weights and "
          f"inputs); frozen weights {r[dtype]['frozen_weights_mb']:.0f} MiB shared by both; process peak RSS "
          f"{r['process_peak_rss_mb']:.0f} MiB")
    for lib, x in (("minidiff", m), ("diffusers", d)):
        if "profile" in x:
            p = x["profile"]
            total = sum(p["regions_ms"].get(k, 0) for k in ("forward", "backward", "optimizer"))
            parts = ", ".join(f"{k} {v / 1e3:.1f}" for k, v in p["regions_ms"].items())
            kinds = ", ".join(f"{k} {100 * v / total:.0f}%"
                              for k, v in sorted(p["kinds_ms"].items(), key=lambda kv: -kv[1]))
            top = ", ".join(f"{k} {v / 1e3:.1f}" for k, v in list(p["top_ops_ms"].items())[:5])
            print(f"  profile {dtype} {lib} (s, regions include children): {parts}\n"
                  f"    self time by kind: {kinds}\n    top ops (s): {top}")
    what = f"training step {size}x{size}, batch 1, {dtype}"
    rows = [row("train", f"{what}, median (s)", {"minidiff": m["median_s"], "diffusers": d["median_s"]},
                dtype=dtype),
            row("train", f"{what}, peak RSS above pre-step (MiB)",
                {lib: max(x["step_peak_mb"]) for lib, x in (("minidiff", m), ("diffusers", d))}, unit="MiB",
                dtype=dtype)]
    return rows, r


WORKERS.update(train=worker_train, features=worker_features)
BENCHMARKS = {"unet": bench_unet, "vae": bench_vae, "restore": bench_restore, "train": bench_train,
              "load": bench_load, "features": bench_features}
DEFAULT = ("unet", "vae", "restore", "train", "load")  # features: only with --only (another environment)


# ------------------------------------------------------------- the table

def ratio(r):
    """minidiff / diffusers, or None when a column is empty."""
    return r["minidiff"] / r["diffusers"] if r["minidiff"] is not None and r["diffusers"] else None


def peak_share(r, lib, gemm):
    """The fraction of the machine's GEMM peak (GFLOP/s, in the row's dtype) that a UNet row reaches."""
    if not r["flops"] or r[lib] is None or r["dtype"] not in gemm:
        return None
    return r["flops"] / r[lib] / (gemm[r["dtype"]] * 1e9)


def _number(v, unit):
    if v is None:
        return "n/a"
    return f"{v:.0f}" if unit == "MiB" else f"{v:.3f}" if v < 10 else f"{v:.1f}"


def format_table(rows, machine, gemm, gemm_n):
    """The markdown table with a header naming the machine, and a footnote on how to read it."""
    cpu, v = machine["cpu"], machine["versions"]
    flags = ", ".join(f"{f} {'yes' if on else 'no'}" for f, on in cpu["flags"].items())
    lines = [f"minidiff vs diffusers {v['diffusers'] or '(not installed)'} / transformers "
             f"{v['transformers'] or '(not installed)'} on {cpu['model']}: {cpu['logical_cpus']} logical "
             f"CPUs, {machine['threads']} torch threads; torch {v['torch']}, Python {machine['python']}",
             f"CPU flags: {flags}; 1-min load average at the start {machine['load_start']:.1f}, at the end "
             f"{machine['load_end']:.1f} (above ~0: other processes shared the cores)",
             "GEMM peak (" + ", ".join(f"{d} {g:.0f} GFLOP/s" for d, g in gemm.items())
             + f"; median of a {gemm_n}x{gemm_n}x{gemm_n} matmul on {machine['threads']} threads)", "",
             "| figure | minidiff | diffusers | ratio |", "|---|---|---|---|"]
    for r in rows:
        cells = []
        for lib in LIBS:
            share = peak_share(r, lib, gemm)
            cells.append(_number(r[lib], r["unit"])
                         + (f" = {100 * share:.0f}% of GEMM peak" if share is not None else ""))
        q = ratio(r)
        lines.append(f"| {r['figure']} | {cells[0]} | {cells[1]} | {'' if q is None else f'{q:.2f}'} |")
    lines += ["", "ratio = minidiff / diffusers (below 1: minidiff faster or leaner). The diffusers column "
              "of restore and train is the official Diff-Plugin code rebuilt from diffusers + transformers. "
              "GEMM peak share = the UNet's FLOPs (torch.utils.flop_counter) / time / the GEMM peak in "
              "that dtype."]
    return "\n".join(lines)


# ------------------------------------------------------------- driver

def parse_args(argv, cpu):
    """The command line, checked, with the preset's counts filled in. Returns (args, preset, the chosen
    benchmarks, the dtypes); a bad value exits 2 through argparse."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--only", default=",".join(DEFAULT),
                   help=f"comma-separated benchmarks, from {', '.join(BENCHMARKS)}")
    p.add_argument("--dtypes", default="fp32,bf16" if cpu["native_bf16"] else "fp32",
                   help="network dtypes (bf16 by default only where the CPU has native bf16: "
                        "avx512_bf16 or amx_bf16)")
    p.add_argument("--quick", action="store_true",
                   help="CI-sized: UNet at 32x32 latents only, VAE 256, restore 256 with 2 steps, train 128, "
                        "one timed run")
    p.add_argument("--runs", type=int,
                   help="timed runs per library of each UNet / VAE figure (full: 3, quick: 1)")
    p.add_argument("--warmup", type=int, help="untimed runs per library before them (full and quick: 1)")
    p.add_argument("--restore-runs", type=int, default=1, help="timed restores per library and dtype")
    p.add_argument("--threads", type=int, default=0, help="torch threads everywhere (0: torch's default)")
    p.add_argument("--checkpoint", help="SD-1.5 single file to load (default: random weights in a temp dir)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument("--load-repeats", type=int, help="fresh load processes per library and dtype (full: 2, "
                   "quick: 1): best time, worst peak")
    p.add_argument("--train-steps", type=int, default=2, help="train: timed steps per library and dtype")
    p.add_argument("--train-warmup", type=int, default=1, help="train: untimed steps first, per library")
    p.add_argument("--no-train-profile", action="store_true", help="train: skip the profiled step")
    p.add_argument("--rounds", type=int, default=1, help="features: processes per library, alternating")
    p.add_argument("--feature-images", type=int, default=32, help="features: images in the timed folder")
    p.add_argument("--feature-batch", type=int, default=16, help="features: batch size (both libraries)")
    p.add_argument("--json", help="also write the rows, the machine and every raw figure to this JSON file")
    args = p.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "full"]
    for key in ("runs", "warmup", "load_repeats"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    chosen = [b.strip() for b in args.only.split(",") if b.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not chosen or any(b not in BENCHMARKS for b in chosen):
        p.error(f"--only: choose from {', '.join(BENCHMARKS)}")
    if not dtypes or any(d not in DTYPES for d in dtypes):
        p.error(f"--dtypes: choose from {', '.join(DTYPES)}")
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        p.error(f"--checkpoint {args.checkpoint}: no such file")
    if min(args.runs, args.restore_runs, args.load_repeats, args.train_steps, args.rounds) < 1 \
            or min(args.warmup, args.train_warmup) < 0:
        p.error("run and repeat counts must be >= 1, warm-up counts >= 0")
    return args, preset, chosen, dtypes


def run_benchmarks(args, preset, dtypes, chosen, save):
    """Run each chosen benchmark in a shared temp dir, dtype by dtype (all of fp32 first: a run cut short
    keeps whole dtypes), calling save(rows, raw) after each one. Returns (table rows, {name: {dtype: raw
    figures}}, failures): a benchmark that fails is reported on stderr and skipped, and the others still
    count. features runs once, with the first dtype."""
    rows, raw = [], {}
    with tempfile.TemporaryDirectory(prefix="minidiff-bench-") as tmp:
        ctx = Context(args, preset, chosen, tmp)
        if "diffusers" not in ctx.libs:
            print("note: diffusers is not installed; only minidiff is measured")
        for dtype in dtypes:
            for name in chosen:
                if name == "features" and dtype != dtypes[0]:
                    continue
                try:
                    r, raw.setdefault(name, {})[dtype] = BENCHMARKS[name](ctx, dtype)
                except RuntimeError as e:
                    ctx.failed.append(f"benchmark: {name} ({dtype}): {e}")
                    print(ctx.failed[-1], file=sys.stderr, flush=True)
                    continue
                rows += r
                save(rows, raw)
    return rows, raw, ctx.failed


def write_json(path, rows, raw, machine, gemm, args, preset, minutes):
    """The rows (with ratio and GEMM share), the machine and every raw figure; `minutes` None while the run
    goes on ("complete": false). Written to a temp name, then renamed: never half a file."""
    rows = [{**r, "ratio": ratio(r), **{f"{lib}_gemm_peak_share": peak_share(r, lib, gemm) for lib in LIBS}}
            for r in rows]
    doc = {"machine": machine, "gemm_gflops": gemm, "gemm_n": preset["gemm"], "complete": minutes is not None,
           "minutes": minutes, "args": vars(args), "rows": rows, "raw": raw}
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(path + ".tmp", path)


def main(argv=None):
    """Measure, print the table (and --json, rewritten after every benchmark); exits with the failed
    benchmarks' lines if any failed."""
    cpu = cpu_info()
    args, preset, chosen, dtypes = parse_args(argv, cpu)
    print("benchmark:", vars(args), flush=True)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    gemm = {d: gemm_gflops(getattr(torch, DTYPES[d]), preset["gemm"]) for d in dtypes}
    machine = {"cpu": cpu, "versions": versions(), "threads": torch.get_num_threads(),
               "python": platform.python_version(), "load_start": load_start}
    print("GEMM peak:", {d: round(g) for d, g in gemm.items()}, "GFLOP/s", flush=True)

    def save(rows, raw, minutes=None):
        if args.json:
            machine["load_end"] = os.getloadavg()[0]
            write_json(args.json, rows, raw, machine, gemm, args, preset, minutes)
    rows, raw, failed = run_benchmarks(args, preset, dtypes, chosen, save)
    minutes, machine["load_end"] = (time.perf_counter() - start) / 60, os.getloadavg()[0]
    print("\n" + format_table(rows, machine, gemm, preset["gemm"]))
    print(f"\n(the whole run took {minutes:.1f} min)")
    save(rows, raw, minutes)
    if failed:
        sys.exit("\n".join(failed))


def _worker_main():
    name, kw = sys.argv[2], json.loads(sys.argv[3])
    import torch
    from minidiff.io.weights import CheckpointError
    if kw.get("threads"):
        torch.set_num_threads(kw["threads"])
    try:
        result = WORKERS[name](kw)
    except CheckpointError as e:  # a file that is not an SD-1.x checkpoint: one line, no traceback
        sys.exit(str(e))
    with open(kw["out"], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == WORKER_FLAG:
        _worker_main()
    else:
        main()
