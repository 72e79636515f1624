"""Training machinery that spans processes: which global samples each rank takes in each update, and data
parallelism over torch.distributed (torchrun's environment, the process group, DDP, the mean over ranks).
The run folder and its checkpoints are in minidiff/train/rundir.py, the CSV log, loss plot and progress bar
in minidiff/train/runlog.py, the seeded draws in minidiff/train/seeding.py; the paper's step in
minidiff/train/training.py. Used by tools/train.py (Task-Plugins), tools/train_selector.py (the
Plugin-Selector) and minidiff/train/small.py (the small family).

Paper: Liu et al., "Diff-Plugin: Revitalizing Details for Diffusion-based Low-level Tasks" (CVPR 2024).
Reference: yuhaoliu7456/Diff-Plugin @ 79e12bb, train.py (accelerate). Changed (see
../shared/reference/official-facts.md §7): draws come from generators seeded by (seed, step, sample), not
from a global RNG, so a resumed run, or one resumed with another number of processes, sees the same
batches, noises and timesteps as an uninterrupted one.

A training tool uses it like this (every rank runs the same code; rank 0 alone writes):

    dist = trainer.setup_distributed("auto", global_batch=64, grad_accum=1)  # torchrun env -> gloo / nccl
    run = rundir.RunDir("runs/x", kind="plugin", task="deblur", resume=True, dist=dist)
    run.check(settings, fixed=("seed", "lr", ...))  # bad input -> UsageError, before any weight loads
    ...build the models, the optimizer...
    run.start(settings, data=listing_info, weights=weight_hashes)  # config.json (rank 0)
    ckpt = run.resume_checkpoint() if resume else None              # None: a fresh run from step 0
    start = 0 if ckpt is None else ckpt.step                      # restore tensors/optimizer from ckpt
    log = runlog.CsvLog(run.path / "log.csv", ["step", "loss"], start, dist)
    model = trainer.wrap_ddp(module, dist)
    for step in range(start + 1, steps + 1):                       # `step` = number of updates done after it
        loss = trainer.all_reduce_mean(loss, dist)                # global-batch mean, same on every rank
        rundir.check_finite(loss, step, run)                      # NaN/inf -> NonFiniteError naming the step
        log.write({"step": step, "loss": loss.item()})
        if step % every == 0:
            run.save_checkpoint(step, tensors, optimizer.state_dict(), data_position=step * batch)
    runlog.plot_loss(run.path / "log.csv", run.path / "loss.png")
    del model                                                      # the DDP wrapper before its process group
    trainer.cleanup_distributed(dist)

Sample bookkeeping: the global batch of update `step` holds the global sample numbers
n = (step - 1) * B ... step * B - 1; `seeding.sample_item(seed, n_items, n)` maps n to (dataset item, epoch)
through a seeded permutation per epoch; `rank_micro_batches` gives each rank its slice, split for
gradient accumulation; `StepBatches` feeds a DataLoader.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from minidiff.errors import UsageError


# ---------------------------------------------------------------------------------------------------------
# Sample bookkeeping over processes (the seeded draws themselves are in minidiff/train/seeding.py)
# ---------------------------------------------------------------------------------------------------------

def rank_micro_batches(step, global_batch, grad_accum, dist):
    """Global sample numbers this rank handles in update `step` (1-based), as `grad_accum` micro-batches.

    The global batch is cut into world_size contiguous slices, one per rank, each cut into grad_accum
    micro-batches: the union over ranks is the same global batch whatever the number of processes.
    """
    per_rank = global_batch // dist.world_size
    micro = per_rank // grad_accum
    first = (step - 1) * global_batch + dist.rank * per_rank
    return [list(range(first + k * micro, first + (k + 1) * micro)) for k in range(grad_accum)]


class StepBatches:
    """A DataLoader batch_sampler: this rank's micro-batches of global sample numbers, update after update,
    for updates start+1 .. steps (rank_micro_batches of each)."""

    def __init__(self, start, steps, global_batch, grad_accum, dist):
        self.start, self.steps, self.global_batch, self.grad_accum, self.dist = \
            start, steps, global_batch, grad_accum, dist

    def __iter__(self):
        for step in range(self.start + 1, self.steps + 1):
            yield from rank_micro_batches(step, self.global_batch, self.grad_accum, self.dist)

    def __len__(self):
        return (self.steps - self.start) * self.grad_accum


# ---------------------------------------------------------------------------------------------------------
# Data parallelism (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0


def setup_distributed(device="auto", global_batch=None, grad_accum=1, join=True):
    """Read torchrun's environment and join the process group (gloo on CPU, nccl on CUDA).

    The batch arithmetic is checked first (a wrong --batch-size fails at once, not after a hang).
    device: "auto" (CUDA when present), "cpu", "cuda". Each rank takes cuda:LOCAL_RANK. join=False: only
    read and check; call join_process_group(dist) once the tool's own input checks have passed.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if global_batch is not None and global_batch % (world * grad_accum):
        raise UsageError(f"--batch-size {global_batch} does not divide over {world} process(es) x "
                         f"--grad-accum {grad_accum}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here")
    dev = torch.device("cuda", local) if device == "cuda" else torch.device("cpu")
    dist = Dist(rank, world, local, dev)
    if join:
        join_process_group(dist)
    return dist


def backend_options(device):
    """Everything of the DDP path that depends on the device, in one place: (process-group backend, keyword
    arguments of DistributedDataParallel). CUDA: NCCL, and the rank's own GPU as device_ids/output_device;
    CPU: gloo and none. The rest is one code path, so the gloo tests on the CPU run the code NCCL runs."""
    if device.type == "cuda":
        return "nccl", {"device_ids": [device.index], "output_device": device.index}
    return "gloo", {}


def join_process_group(dist):
    if dist.device.type == "cuda":
        torch.cuda.set_device(dist.device)
    if dist.world_size > 1 and not torch_dist.is_initialized():
        backend, _ = backend_options(dist.device)
        torch_dist.init_process_group(backend, rank=dist.rank, world_size=dist.world_size)


def cleanup_distributed(dist):
    """Destroy the process group. Drop the DDP wrapper first (`del model`): a wrapper freed after its group
    can hang the process for good on gloo (torch 2.13: ~ProcessGroupGloo, run from the wrapper's deallocation,
    joins its worker thread while holding the GIL, and that thread needs the GIL to free the last collective's
    state; seen in 4 of 8 runs of tests/test_train_gpu_paths.py's DDP test)."""
    if dist.world_size > 1 and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier(dist):
    if dist.world_size > 1:
        torch_dist.barrier()


def check_on_main(dist, check):
    """Run `check()` on rank 0 only (e.g. decoding every image once), share its UsageError with every rank,
    and raise it everywhere, so all processes stop together with the same one-line message."""
    message = [None]
    if dist.is_main:
        try:
            check()
        except UsageError as e:
            message[0] = str(e)
    if dist.world_size > 1:
        torch_dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise UsageError(message[0])


def all_reduce_mean(value, dist):
    """Mean over ranks of a tensor (each rank's mean over its equal share = the global-batch mean)."""
    if dist.world_size == 1:
        return value
    value = value.detach().clone()
    torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM)
    return value / dist.world_size


def wrap_ddp(module, dist):
    """DistributedDataParallel around `module` when running under torchrun, else the module itself.

    DDP averages the gradients of the trainable parameters over ranks during backward; use its no_sync()
    for the gradient-accumulation micro-batches before the last one.
    """
    if dist.world_size == 1:
        return module
    _, options = backend_options(dist.device)
    return torch.nn.parallel.DistributedDataParallel(module, **options)
