"""Sharded restoration under torchrun: each process restores its share of the photos, one summary at the end.

    torchrun --nproc_per_node 4 tools/sample.py --input test/ --task derain --output out/   # 4 GPUs or CPUs
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_endpoint HOST:29500 tools/sample.py ...      # shared storage

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is one process of one (rank 0 of 1). The
photos are the sorted list tools/sample.py plans; rank r takes photos r, r + N, r + 2N, ... (N = world size),
so every photo is restored exactly once, and since each photo's noise comes from its own seeded generator,
the pixels are those of a one-process run on the same device and dtype. On GPUs rank r runs on
cuda:LOCAL_RANK; on the CPU every rank runs on the CPU. The processes talk only at the end, to merge the
summary (photos done, failed, skipped, seconds, photos/s): over gloo, which works on every machine and needs no
GPU memory. A photo that fails is recorded (OUTPUT/<stem>.failed.json: input, error, rank) and its rank goes on;
a rank that dies leaves only whole files (every output is written atomically, the JSON record last), and a
rerun with --skip-existing restores what is missing. This helper module of the scripts beside it is not a script.
"""
import datetime
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from minidiff.io.files import save_json_atomic


@dataclass
class Shard:
    """This process's place in the run: rank of world_size, and its local rank on the node."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    t0: float = field(default_factory=time.perf_counter)

    @property
    def distributed(self):
        return self.world_size > 1

    def share(self, photos):
        """Photos r, r + N, ...: this rank's share of the sorted list."""
        return list(photos)[self.rank::self.world_size]

    def record(self):
        """What every photo's JSON record says about the process that made it."""
        return {"rank": self.rank, "world_size": self.world_size}


def start(args):
    """The Shard of this process, from torchrun's environment; under torchrun the gloo process group is
    joined and, on CUDA, args.device becomes cuda:LOCAL_RANK."""
    env = os.environ
    if "WORLD_SIZE" not in env or int(env["WORLD_SIZE"]) <= 1:
        return Shard()
    shard = Shard(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    # only the summary travels between processes; a rank with little work may wait hours for the others
    dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    if str(args.device).startswith("cuda"):
        torch.cuda.set_device(shard.local_rank)
        args.device = f"cuda:{shard.local_rank}"
    return shard


def failed_name(stem):
    return stem + ".failed.json"


def restore_share(shard, todo, restore_one, out_dir, stem_of, progress_write=print):
    """Run restore_one(path) on each photo of todo; under torchrun a photo that raises (anything but Ctrl-C)
    is recorded in OUTPUT/<stem>.failed.json and the rank goes on, in one process the error stops the run as
    before. Returns (done, [(photo, error line)])."""
    done, failed = 0, []
    for path in todo:
        stale = os.path.join(out_dir, failed_name(stem_of(path)))
        try:
            restore_one(path)
        except Exception as e:  # noqa: BLE001 - a rank must reach the final summary whatever one photo does
            if not shard.distributed:
                raise
            line = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            failed.append((path, line))
            save_json_atomic({"input": os.path.abspath(path), "error": line, **shard.record()}, stale)
            progress_write(f"failed: {path}: {line} (rank {shard.rank}; recorded in {stale})")
            continue
        if os.path.exists(stale):  # an earlier failure of this photo, now restored
            os.remove(stale)
        done += 1
    return done, failed


def finish(shard, done, failed, skipped, t_start):
    """Merge every rank's counts on rank 0 and print one summary there; returns the run's number of failed
    photos (the same on every rank, so that every process exits with the same status)."""
    mine = {"done": done, "failed": failed, "skipped": skipped, "seconds": time.perf_counter() - t_start}
    if shard.distributed:
        parts = [None] * shard.world_size
        dist.all_gather_object(parts, mine)
        dist.destroy_process_group()
    else:
        parts = [mine]
    total = sum(p["done"] for p in parts)
    fails = [f for p in parts for f in p["failed"]]
    seconds = max(p["seconds"] for p in parts)  # the slowest rank ends the run
    if shard.rank == 0:
        rate = total / seconds if seconds > 0 else 0.0
        print(f"summary: {total} done, {len(fails)} failed, {sum(p['skipped'] for p in parts)} skipped "
              f"(done before), {seconds:.1f} s, {rate:.3f} photos/s over {shard.world_size} process(es)")
        for path, line in fails:
            print(f"failed: {path}: {line}", file=sys.stderr)
        if fails:
            print("(rerun with --skip-existing to retry the failed photos only)", file=sys.stderr)
    return len(fails)
