#!/usr/bin/env python
"""Benchmark minidiff against diffusers on the same random SD-1.5 weights (UNet speed, checkpoint loading).

    python tools/benchmark.py --json bench.json              # all; random SD-1.5 file in a temp dir
    python tools/benchmark.py --only unet --runs 1 --warmup 0  # CPU-sized: one UNet forward per library
    python tools/benchmark.py --only load --checkpoint checkpoints/v1-5-pruned-emaonly.safetensors
    python tools/benchmark.py --only train --train-steps 4 --json train.json   # 512x512 steps, ~15 min
    python tools/benchmark.py --only train --train-size 128 --train-steps 1 --train-dtypes fp32  # CPU-sized

Benchmarks (one function each, registered in BENCHMARKS; `--only a,b` picks some):
  unet  UNet forward, batch 1, 64x64 latents, fp32 on the CPU: warm-up runs, then the median of all timed
        runs (--runs per process, --rounds processes per library, the libraries taking turns).
  load  load a full SD-1.5 single-file checkpoint (text encoder, UNet, VAE, tokenizer): wall time of the load
        call, and of the load plus a first read of every weight (both libraries may map the file lazily),
        and the peak RSS of the process after that read.
  features  FID/KID feature extraction (tools/evaluate.py's path: read, resize, network), random weights, on
        --feature-images generated 512x384 PNGs: images/s of minidiff vs clean-fid's CLIP ViT-B/32 path and
        vs pytorch-fid's Inception (the reference side runs in MINIDIFF_ORACLE_PYTHON's environment); the best
        of --rounds alternating processes per library.
  plugin  one Diff-Plugin restore (--plugin-steps UniPC steps) of a --plugin-size photo with full-size random
        networks, fp32: minidiff against the official loop rebuilt from diffusers + transformers
        (tools/official_oracle.py, the parity tests' reference); wall time and peak RSS.
  train  one Task-Plugin training step (plugin_loss + backward + clip + AdamW) at --train-size, batch 1,
        frozen networks in fp32 and bf16 (the plugin in fp32): minidiff against the official train.py step
        rebuilt from diffusers + transformers (tools/official_oracle.py), in ONE process on the same weight
        tensors, the libraries taking turns: wall and CPU time (median of --train-steps), the step's peak RSS
        above the RSS before it, and a torch.profiler breakdown (regions, op kinds, top ops).
Every other measurement runs in a fresh Python process (one per library and repeat), so memory figures
start clean and two full UNets never sit in one process. Both libraries read the same file: an SD-1.5 single
file (original CompVis names) with random weights, written once tensor by tensor, or --checkpoint. diffusers
loads it fully offline with StableDiffusionPipeline.from_single_file(config=<local folder>) and
UNet2DConditionModel.from_single_file; the local config folder holds the SD-1.5 component configs and a
tokenizer written from minidiff's vocabulary.
Without diffusers, only minidiff's column is filled (train needs diffusers + transformers).
"""
import argparse
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import time

# Run from a checkout too (workers are fresh interpreters started on this file).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# glibc malloc settings for --malloc-tuned: large blocks come from the heap instead of a fresh mmap per
# allocation, so activations do not page-fault on every forward. Without them, glibc's dynamic mmap threshold
# depends on what a process freed earlier (diffusers' loader frees large blocks, minidiff's does not), which
# alone moved the UNet forward by ~15% in CPU time here.
MALLOC_TUNED = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296",
                "MALLOC_TOP_PAD_": "268435456"}
WORKER_FLAG = "--worker"  # internal: `benchmark.py --worker NAME JSON-ARGS` runs one measurement


# ------------------------------------------------------------- shared: random checkpoint, diffusers configs

# Non-weight buffers that the original LatentDiffusion single file also carries (loaders must ignore them).
SCHEDULE_BUFFERS = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"]


def write_random_sd15(path, seed=0):
    """Write an SD-1.5 single file (original names, fp32) with random weights, one tensor at a time."""
    import torch
    from minidiff.clip import CLIP_TEXT_L14, CLIPTextModel
    from minidiff.unet import UNet, UNetConfig
    from minidiff.vae import AutoencoderKL, VAEConfig
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
    from minidiff.tokenizer import CLIPTokenizer, read_merges
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
    """What the benchmarks share: parsed arguments, the temp dir, and the checkpoint written on first use."""

    def __init__(self, args, tmp):
        self.args, self.tmp, self._ckpt, self._config = args, tmp, args.checkpoint, None
        self.have_diffusers = subprocess.run([sys.executable, "-c", "import diffusers"],
                                             capture_output=True).returncode == 0

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

    def run(self, worker, **kw):
        """Run one worker in a fresh interpreter; return its result dict (the last stdout line, JSON)."""
        kw.update(threads=self.args.threads, tmp=self.tmp)
        python = kw.pop("python", None) or sys.executable  # features: reference side in the oracle env
        cmd = [python, os.path.abspath(__file__), WORKER_FLAG, worker, json.dumps(kw)]
        env = {**os.environ, **(MALLOC_TUNED if self.args.malloc_tuned else {})}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
        if proc.returncode != 0:  # a CheckpointError comes back as one line, anything else with a traceback
            err = proc.stderr.strip() or "?"
            raise RuntimeError(f"{worker} ({kw.get('lib')}) failed: "
                               + (err[-3000:] if "Traceback" in err else err.splitlines()[-1]))
        return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------- workers (each runs in its own process)

def _rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _peak_rss_mb():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker_load(kw):
    """Load the whole pipeline from the single file: time, memory (peak RSS, and RSS after the imports)."""
    import torch
    if kw["lib"] == "minidiff":
        import minidiff
        load = lambda: minidiff.load_stable_diffusion(kw["ckpt"], dtype=torch.float32)  # noqa: E731
    else:
        from diffusers import StableDiffusionPipeline
        load = lambda: StableDiffusionPipeline.from_single_file(  # noqa: E731
            kw["ckpt"], config=kw["config"], local_files_only=True, torch_dtype=torch.float32,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    base = _rss_mb()
    t = time.perf_counter()
    pipe = load()
    seconds = time.perf_counter() - t
    # Both libraries may leave weights as lazily read (memory-mapped) pages that are only read at first use:
    # touch one value per 4 KiB page of every tensor, so "ready" counts reading the whole file.
    parts = vars(pipe).values() if kw["lib"] == "minidiff" else pipe.components.values()
    modules = [m for m in parts if isinstance(m, torch.nn.Module)]
    tensors = [v for m in modules for v in m.state_dict().values()]
    checksum = sum(float(v.flatten()[::1024].double().sum()) for v in tensors)
    return {"seconds": seconds, "ready_seconds": time.perf_counter() - t, "peak_rss_mb": _peak_rss_mb(),
            "import_rss_mb": base, "modules": len(modules), "tensors": len(tensors), "checksum": checksum}


def worker_unet(kw):
    """UNet from the single file; time forward passes on fixed inputs; save eps for a cross-check."""
    import torch
    if kw["lib"] == "minidiff":
        from minidiff.unet import UNet, UNetConfig
        from minidiff.weights import load_strict, read_state_dict
        with torch.device("meta"):
            unet = UNet(UNetConfig())
        unet = load_strict(unet, read_state_dict(kw["ckpt"], "model.diffusion_model."), "UNet")
        forward = lambda x, t, c: unet(x, t, c)  # noqa: E731
    else:
        from diffusers import UNet2DConditionModel
        unet = UNet2DConditionModel.from_single_file(kw["ckpt"], config=kw["config"], subfolder="unet",
                                                     local_files_only=True, torch_dtype=torch.float32).eval()
        forward = lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample  # noqa: E731
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, kw["size"], kw["size"], generator=g)  # latents [1, 4, 64, 64]
    context = torch.randn(1, 77, 768, generator=g)  # text hidden states [1, 77, 768]
    t = torch.tensor([500])
    times, cpu = [], []
    with torch.inference_mode():
        for i in range(kw["warmup"] + kw["runs"]):
            start, start_cpu = time.perf_counter(), time.process_time()
            eps = forward(x, t, context)
            if i >= kw["warmup"]:  # wall time, and CPU time of all threads (steadier on a busy machine)
                times.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
    out = os.path.join(kw["tmp"], f"eps-{kw['lib']}.pt")
    torch.save(eps.clone(), out)
    return {"times_s": times, "cpu_s": cpu, "eps": out, "threads": torch.get_num_threads()}


def worker_plugin(kw):
    """One Diff-Plugin restore (UniPC, kw steps) of a size x size photo with full-size random networks, fp32.

    minidiff: minidiff.plugin.restore. diffusers: the official loop rebuilt from diffusers + transformers in
    tools/official_oracle.py (the parity tests' reference). Timing only: each side draws its own random
    weights.
    """
    import numpy as np
    import torch
    from PIL import Image
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).resize((kw["size"],) * 2)
    if kw["lib"] == "minidiff":
        from minidiff.clip import CLIP_VISION_L14, CLIPVisionModel
        from minidiff.plugin import SCB, TPB, TaskPlugin, restore
        from minidiff.unet import UNet, UNetConfig
        from minidiff.vae import AutoencoderKL, VAEConfig
        from minidiff.loading import StableDiffusion
        sd = StableDiffusion(None, None, UNet(UNetConfig()).eval(), AutoencoderKL(VAEConfig()).eval())
        clip, plugin = CLIPVisionModel(CLIP_VISION_L14).eval(), TaskPlugin("derain", TPB(), SCB()).eval()
        run = lambda: restore(sd, clip, [plugin], photo, steps=kw["steps"], clip_image=photo,  # noqa: E731
                              progress=False)
    else:
        import official_oracle as oracle  # tools/, beside this file
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPVisionConfig, CLIPVisionModel
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8).eval()  # SD 1.x sizes
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2).eval()
        clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                                num_hidden_layers=24, num_attention_heads=16, patch_size=14,
                                                hidden_act="quick_gelu")).eval()
        plugin = ("derain", oracle.RefTPB(1024, 768).eval(), oracle.RefSCB(320, 8, 768).eval())
        run = lambda: oracle.official_restore(unet, vae, clip, [plugin], photo, photo,  # noqa: E731
                                              steps=kw["steps"])
    t = time.perf_counter()
    with torch.inference_mode():
        run()
    return {"seconds": time.perf_counter() - t, "peak_rss_mb": _peak_rss_mb(),
            "threads": torch.get_num_threads()}


WORKERS = {"load": worker_load, "unet": worker_unet, "plugin": worker_plugin}


# ------------------------------------------------------------- benchmarks (one function each)

def libraries(ctx):
    return ["minidiff"] + (["diffusers"] if ctx.have_diffusers else [])


def bench_unet(ctx):
    a = ctx.args
    res = {lib: {"times_s": [], "cpu_s": []} for lib in libraries(ctx)}
    for _ in range(a.rounds):  # alternate the libraries, so a change in machine load hits both alike
        for lib in res:
            r = ctx.run("unet", lib=lib, ckpt=ctx.checkpoint(), config=ctx.diffusers_config(),
                        size=a.latent_size, warmup=a.warmup, runs=a.runs)
            res[lib].update(r, **{k: res[lib][k] + r[k] for k in ("times_s", "cpu_s")})
    for r in res.values():
        r["median_s"], r["median_cpu_s"] = (sorted(r[k])[len(r[k]) // 2] for k in ("times_s", "cpu_s"))
    size = f"{a.latent_size}x{a.latent_size}"
    rows = [("unet", f"forward {size} fp32, wall (median s)",
             res["minidiff"]["median_s"], res.get("diffusers", {}).get("median_s")),
            ("unet", f"forward {size} fp32, CPU time (median s)",
             res["minidiff"]["median_cpu_s"], res.get("diffusers", {}).get("median_cpu_s"))]
    if "diffusers" in res:  # same weights and inputs: the outputs agree (a sanity check, not a parity test)
        import torch
        e = [torch.load(res[lib]["eps"], weights_only=True) for lib in ("minidiff", "diffusers")]
        print(f"unet: max|eps diff| minidiff vs diffusers {(e[0] - e[1]).abs().max().item():.2e} "
              f"(max|eps| {e[1].abs().max().item():.2e}); threads {res['minidiff']['threads']}")
    return rows, res


def bench_load(ctx):
    res = {lib: [] for lib in libraries(ctx)}
    for _ in range(ctx.args.load_repeats):  # alternate the libraries so both see a warm page cache
        for lib in res:
            res[lib].append(ctx.run("load", lib=lib, ckpt=ctx.checkpoint(), config=ctx.diffusers_config()))
    fig = {lib: {"seconds": min(r["seconds"] for r in runs),
                 "ready_seconds": min(r["ready_seconds"] for r in runs),
                 "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                 "import_rss_mb": min(r["import_rss_mb"] for r in runs)} for lib, runs in res.items()}
    sums = {lib: runs[0]["checksum"] for lib, runs in res.items()}
    print(f"load: checksum of every 1024th weight value {sums} (equal: the same weights loaded)")
    d = fig.get("diffusers", {})
    rows = [("load", "load call, best of runs (s)", fig["minidiff"]["seconds"], d.get("seconds")),
            ("load", "load + read every weight, best (s)", fig["minidiff"]["ready_seconds"],
             d.get("ready_seconds")),
            ("load", "peak RSS (MiB)", fig["minidiff"]["peak_rss_mb"], d.get("peak_rss_mb")),
            ("load", "peak RSS minus RSS after imports (MiB)",
             fig["minidiff"]["peak_rss_mb"] - fig["minidiff"]["import_rss_mb"],
             d["peak_rss_mb"] - d["import_rss_mb"] if d else None)]
    return rows, {"runs": res, "summary": fig}


def bench_plugin(ctx):
    """Wall time of one 20-step Diff-Plugin restore of a 512x512 photo, CPU fp32, minidiff vs the diffusers
    loop."""
    a, res = ctx.args, {lib: [] for lib in libraries(ctx)}
    for _ in range(a.rounds):
        for lib in res:
            res[lib].append(ctx.run("plugin", lib=lib, size=a.plugin_size, steps=a.plugin_steps))
    best = {lib: min(r["seconds"] for r in runs) for lib, runs in res.items()}
    peak = {lib: max(r["peak_rss_mb"] for r in runs) for lib, runs in res.items()}
    label = f"restore {a.plugin_size}x{a.plugin_size}, {a.plugin_steps} steps"
    return [("plugin", f"{label}, wall (best s)", best["minidiff"], best.get("diffusers")),
            ("plugin", f"{label}, peak RSS (MiB)", peak["minidiff"], peak.get("diffusers"))], res


BENCHMARKS = {"unet": bench_unet, "load": bench_load, "plugin": bench_plugin}


# ------------------------------------------------------------- features (M): FID/KID feature extraction

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
        from minidiff import metrics
        from minidiff.clip import CLIP_VISION_B32, CLIPVisionModel
        from minidiff.inception import FIDInception, inception_pixels
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


def bench_features(ctx):
    """Images/s of FID/KID feature extraction: minidiff vs clean-fid (CLIP) / pytorch-fid (Inception)."""
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
        rows.append(("features", f"{feature} s/image (ref: {ref})", 1 / r["minidiff"]["images_per_s"],
                     1 / r[ref]["images_per_s"] if ref in r else None))
    return rows, res


WORKERS["features"] = worker_features
BENCHMARKS["features"] = bench_features


# ------------------------------------------------------------- train: one Task-Plugin training step

TRAIN_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
# forward regions labelled in the profile (module attribute paths, the same for both libraries' objects)
TRAIN_REGIONS = ("vae.encoder", "clip", "tpb", "scb", "unet")
# op-name fragments -> category, first match wins (self CPU time of aten ops, forward and backward)
OP_KINDS = (("attention", ("scaled_dot_product", "flash_attention", "softmax", "baddbmm", "bmm")),
            ("convolution", ("conv",)), ("matmul", ("addmm", "aten::mm", "matmul", "linear")),
            ("norm", ("group_norm", "layer_norm")))


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
    from minidiff.clip import CLIP_VISION_L14, CLIPVisionModel
    from minidiff.loading import StableDiffusion, build_unet, build_vae
    from minidiff.plugin_files import build_plugin
    from minidiff.training import clip_and_step, make_optimizer, plugin_loss
    from minidiff.weights import CLIP_IGNORED, load_strict, scb_from_diffusers
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
    for name in sorted(kw["dtypes"], key=list(TRAIN_DTYPES).index):  # fp32 first: cast down, never up
        dtype = getattr(torch, TRAIN_DTYPES[name])
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
    out["threads"], out["process_peak_rss_mb"] = torch.get_num_threads(), _peak_rss_mb()
    return out


def bench_train(ctx):
    """Images/s and peak memory of one Task-Plugin training step, minidiff vs the official step rebuilt
    from diffusers + transformers, alternating in one process; a profile of where the time goes."""
    a = ctx.args
    if not ctx.have_diffusers:
        raise RuntimeError("the train benchmark needs diffusers + transformers (the reference step)")
    r = ctx.run("train", size=a.train_size, dtypes=a.train_dtypes.split(","), steps=a.train_steps,
                warmup=a.train_warmup, profile=not a.no_train_profile, seed=a.seed)
    rows, s = [], f"{a.train_size}x{a.train_size} b1"
    for name in (d for d in TRAIN_DTYPES if d in r):
        m, d = r[name]["minidiff"], r[name]["diffusers"]
        times = " / ".join(", ".join(f"{t:.1f}" for t in x["times_s"]) for x in (m, d))
        print(f"train {name}: images/s minidiff {m['images_per_s']:.4f}, diffusers {d['images_per_s']:.4f} "
              f"(wall s per step: {times}); first loss {m['warmup_loss'][0]:.6f} / "
              f"{d['warmup_loss'][0]:.6f} (same weights and inputs); frozen weights "
              f"{r[name]['frozen_weights_mb']:.0f} MiB shared by both; {r['threads']} threads; process peak "
              f"RSS (both libraries' steps, one copy of the weights) {r['process_peak_rss_mb']:.0f} MiB")
        for lib, x in (("minidiff", m), ("diffusers", d)):
            if "profile" in x:
                p = x["profile"]
                total = sum(p["regions_ms"].get(k, 0) for k in ("forward", "backward", "optimizer"))
                parts = ", ".join(f"{k} {v / 1e3:.1f}" for k, v in p["regions_ms"].items())
                kinds = ", ".join(f"{k} {100 * v / total:.0f}%"
                                  for k, v in sorted(p["kinds_ms"].items(), key=lambda kv: -kv[1]))
                top = ", ".join(f"{k} {v / 1e3:.1f}" for k, v in list(p["top_ops_ms"].items())[:5])
                print(f"  profile {name} {lib} (s, regions include children): {parts}\n"
                      f"    self time by kind: {kinds}\n    top ops (s): {top}")
        rows += [("train", f"step {s} {name}, wall s/image (median)", m["median_s"], d["median_s"]),
                 ("train", f"step {s} {name}, CPU s/image (median)", m["median_cpu_s"], d["median_cpu_s"]),
                 ("train", f"step {s} {name}, peak RSS above pre-step (MiB)", max(m["step_peak_mb"]),
                  max(d["step_peak_mb"]))]
    return rows, r


WORKERS["train"] = worker_train
BENCHMARKS["train"] = bench_train


# ------------------------------------------------------------- driver

def print_table(rows):
    print(f"\n{'benchmark':<10} {'metric':<42} {'minidiff':>10} {'diffusers':>10} {'ratio':>7}")
    for bench, metric, mine, ref in rows:
        ref_s = f"{ref:10.2f}" if ref is not None else f"{'n/a':>10}"
        ratio = f"{mine / ref:7.2f}" if ref else f"{'':>7}"
        print(f"{bench:<10} {metric:<42} {mine:10.2f} {ref_s} {ratio}")
    print("ratio = minidiff / diffusers (below 1: minidiff is faster / leaner)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated benchmarks to run")
    p.add_argument("--checkpoint", help="SD-1.5 single file to load (default: random weights in a temp dir)")
    p.add_argument("--runs", type=int, default=3, help="timed UNet forward passes (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed UNet forward passes first")
    p.add_argument("--rounds", type=int, default=1, help="UNet / features processes per library, alternating")
    p.add_argument("--latent-size", type=int, default=64, help="latent height and width (UNet forward)")
    p.add_argument("--load-repeats", type=int, default=2, help="loads per library (best time, worst peak)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in workers (0: default)")
    p.add_argument("--malloc-tuned", action="store_true",
                   help="run both libraries' workers with the same glibc malloc settings (see MALLOC_TUNED)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random checkpoint")
    p.add_argument("--plugin-size", type=int, default=512, help="plugin: photo height and width")
    p.add_argument("--plugin-steps", type=int, default=20, help="plugin: UniPC steps")
    p.add_argument("--feature-images", type=int, default=32, help="features: images in the timed folder")
    p.add_argument("--feature-batch", type=int, default=16, help="features: batch size (both libraries)")
    p.add_argument("--train-size", type=int, default=512, help="train: photo height and width (batch 1)")
    p.add_argument("--train-dtypes", default="fp32,bf16", help="train: frozen-network dtypes (plugin: fp32)")
    p.add_argument("--train-steps", type=int, default=2, help="train: timed steps per library and dtype")
    p.add_argument("--train-warmup", type=int, default=2, help="train: untimed steps first, per library")
    p.add_argument("--no-train-profile", action="store_true", help="train: skip the profiled step")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    chosen = [b.strip() for b in args.only.split(",") if b.strip()]
    bad = [b for b in chosen if b not in BENCHMARKS]
    if bad or not chosen:
        sys.exit(f"benchmark: unknown benchmark {bad} (choose from {', '.join(BENCHMARKS)})")
    if any(d not in TRAIN_DTYPES for d in args.train_dtypes.split(",")):
        sys.exit(f"benchmark: --train-dtypes: choose from {', '.join(TRAIN_DTYPES)}")
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        sys.exit(f"benchmark: {args.checkpoint}: no such file")
    if min(args.runs, args.rounds, args.load_repeats) < 1 or args.warmup < 0:
        sys.exit("benchmark: --runs, --rounds and --load-repeats must be >= 1, --warmup >= 0")
    print("benchmark:", vars(args), flush=True)
    rows, figures = [], {"args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="minidiff-bench-") as tmp:
        ctx = Context(args, tmp)
        if not ctx.have_diffusers:
            print("note: diffusers is not installed; only minidiff is measured")
        for name in chosen:
            try:
                r, figures[name] = BENCHMARKS[name](ctx)
            except RuntimeError as e:
                sys.exit(f"benchmark: {name}: {e}")
            rows += r
    print_table(rows)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump({"rows": rows, **figures}, f, indent=1)
        os.replace(args.json + ".tmp", args.json)


def _worker_main():
    name, kw = sys.argv[2], json.loads(sys.argv[3])
    import torch
    from minidiff.weights import CheckpointError
    if kw.get("threads"):
        torch.set_num_threads(kw["threads"])
    try:
        print(json.dumps(WORKERS[name](kw)))
    except CheckpointError as e:  # a file that is not an SD-1.x checkpoint: one line, no traceback
        sys.exit(str(e))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == WORKER_FLAG:
        _worker_main()
    else:
        main()
