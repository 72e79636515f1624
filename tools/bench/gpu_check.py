#!/usr/bin/env python
"""The GPU checks of training and the compiled restore, ready for the first time a GPU is at hand: one line
per check, "ok NAME ..." / "skip NAME: why" / "fail NAME: why", exit status 1 if any failed.

    python tools/bench/gpu_check.py                  # CUDA: ~1-3 min (mostly the inductor compiles)
    python tools/bench/gpu_check.py --cpu-smoke      # the same code on the CPU, compile on dynamo's eager
                                                     # backend (inductor's CPU code generation takes minutes)

Checks, in order: train-{fp16,bf16}-{eager,compiled}: 3 updates of the real training step (tools/train.py's
PluginObjective, accumulate_gradients, clip_and_step; fp16 with the gradient scaler) on the random tiny
networks of --fake-weights, the frozen networks in half precision and the plugin in fp32, TF32 matmuls on
as the official run; each line gives the losses, the seconds per update after the first, and the first loss's
relative difference from the same step in fp32. ddp-nccl: torchrun --nproc_per_node 2 tools/train.py
--fake-weights --device cuda (NCCL) when 2 or more GPUs are present. restore-compiled: restore(compile=True)
(SCB + UNet as one graph, CUDA graphs on CUDA) against eager, the largest difference in 8-bit levels.
The whole run has its own time limit (--timeout, default 300 s): past it, the check in progress fails.
"""
import argparse
import functools
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

CHECK_NAMES = ["train-fp16-eager", "train-fp16-compiled", "train-bf16-eager", "train-bf16-compiled",
               "ddp-nccl", "restore-compiled"]
STEPS = 3


class TimeLimit(Exception):
    pass


def on_alarm(signum, frame):
    raise TimeLimit("past --timeout")


def train_losses(device, dtype, compiled, resolution):
    """Losses and seconds per update of STEPS updates of the real training step on the fake tiny networks."""
    from minidiff.plugin.fake import fake_models
    from minidiff.train import trainer, training
    models = fake_models(["deblur"], with_selector=False, device=device, dtype=dtype)
    plugin = models.plugins["deblur"].float().train().requires_grad_(True)
    objective = training.PluginObjective(models.sd, models.clip_vision, plugin)
    model = torch.compile(objective, dynamic=False) if compiled else objective
    optimizer = training.make_optimizer(plugin, 1e-3)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    dist = trainer.Dist(device=device)
    g = torch.Generator().manual_seed(0)
    latent = (models.sd.vae.cfg.z_channels, resolution // 8, resolution // 8)
    losses, times = [], []
    for step in range(1, STEPS + 1):
        pair = (torch.rand(2, 2, 3, resolution, resolution, generator=g) * 2 - 1).to(device)
        micro = [(pair[0], pair[1], torch.tensor([2 * step, 2 * step + 1]))]
        t0 = time.perf_counter()
        loss = training.accumulate_gradients(model, micro, 42, step, latent, dist, scaler)
        training.clip_and_step(plugin, optimizer, scaler)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return losses, sum(times[1:]) / max(1, len(times) - 1)


def check_train(device, dtype_name, compiled, resolution, reference):
    dtype = getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[dtype_name])
    losses, per_step = train_losses(device, dtype, compiled, resolution)
    if not all(np.isfinite(losses)):
        raise AssertionError(f"non-finite loss {losses}")
    rel = abs(losses[0] - reference) / abs(reference)
    return f"losses {' '.join(f'{v:.5f}' for v in losses)}, {per_step:.3f} s/update, first loss vs fp32 {rel:.1e}"


def check_ddp(device, cpu_smoke):
    if cpu_smoke:
        return None, "--cpu-smoke (tests/test_train_gpu_paths.py runs the same DDP code on gloo)"
    if torch.cuda.device_count() < 2:
        return None, f"{torch.cuda.device_count()} GPU(s); NCCL DDP needs 2"
    photos = tempfile.mkdtemp(prefix="gpu_check_")
    rng = np.random.default_rng(0)
    from PIL import Image
    for i in range(8):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(os.path.join(photos, f"p{i}.png"))
    out = os.path.join(photos, "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", os.path.join(ROOT, "tools", "train.py"),
           "--fake-weights", "--task", "deblur", "--degrade", "deblur", "--data", photos, "--output", out,
           "--steps", "4", "--batch-size", "4", "--resolution", "64", "--val-pairs", "0", "--num-workers", "0",
           "--device", "cuda"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "TQDM_DISABLE": "1"})
    if r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}: {(r.stderr.strip().splitlines() or [''])[-1]}")
    with open(os.path.join(out, "log.csv")) as f:
        rows = f.read().splitlines()[1:]
    return f"2 processes, {len(rows)} updates, last loss {rows[-1].split(',')[1]}", None


def check_restore(device, resolution):
    from PIL import Image
    from minidiff.plugin.fake import fake_models
    from minidiff.plugin.plugin import compiled_denoise_step, restore
    models = fake_models(["deblur"], with_selector=False, device=device)
    photo = Image.fromarray((np.random.default_rng(0).random((resolution, resolution, 3)) * 255).astype(np.uint8))
    plugin = models.plugins["deblur"]
    eager = restore(models.sd, models.clip_vision, [plugin], photo, steps=3, progress=False)
    compiled_denoise_step.cache_clear()
    t0 = time.perf_counter()
    fast = restore(models.sd, models.clip_vision, [plugin], photo, steps=3, progress=False, compile=True)
    first = time.perf_counter() - t0
    diff = int(np.abs(np.asarray(eager, np.int16) - np.asarray(fast, np.int16)).max())
    if diff > 2:
        raise AssertionError(f"compiled restore differs from eager by {diff} levels")
    return f"max difference {diff} levels (8-bit), first compiled restore {first:.1f} s"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="run every check's code on the CPU (no GPU needed)")
    p.add_argument("--timeout", type=int, default=300, help="seconds for the whole run")
    p.add_argument("--resolution", type=int, default=64, help="photo size of the checks (multiple of 8)")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        device = torch.device("cpu")
        torch.compile = functools.partial(torch.compile, backend="eager")  # dynamo only, no code generation
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True  # as tools/train.py and the official run
    else:
        print("fail cuda: no CUDA device (use --cpu-smoke to run the code on the CPU)", flush=True)
        return 1
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(args.timeout)
    failed = False
    reference = None
    for name in CHECK_NAMES:
        try:
            if name.startswith("train-"):
                if reference is None:
                    reference = train_losses(device, torch.float32, False, args.resolution)[0][0]
                _, dtype_name, mode = name.split("-")
                line, skip = check_train(device, dtype_name, mode == "compiled", args.resolution, reference), None
            elif name == "ddp-nccl":
                line, skip = check_ddp(device, args.cpu_smoke)
            else:
                line, skip = check_restore(device, args.resolution), None
            print(f"skip {name}: {skip}" if skip else f"ok {name} {line}", flush=True)
        except (Exception, TimeLimit) as e:
            failed = True
            first = (str(e).splitlines() or [""])[0][:200]
            print(f"fail {name}: {type(e).__name__}: {first}", flush=True)
            if isinstance(e, TimeLimit):
                break
    signal.alarm(0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
