"""Learning-rate schedules of the official training script: constant (its default), linear warm-up then
constant, linear warm-up then half a cosine down to 0.

Reference: yuhaoliu7456/Diff-Plugin @ 79e12bb, train.py l.60-61 (`--lr_scheduler constant`,
`--lr_warmup_steps 500`) and l.205-212, which calls diffusers' `get_scheduler` (diffusers/optimization.py).
There "constant" ignores the warm-up steps; minidiff keeps that. The official run builds its schedule
over micro-batches (warm-up and length both x gradient accumulation) and steps it on each one, which under
accelerate amounts to one schedule step per optimizer update: here the schedule is counted in updates.

The factor is a pure function of (name, warm-up, total, update number), so a resumed run recomputes the
same lr; the checkpoint stores the schedule's settings (state_dict) so that a resume can check them.
"""
import math

SCHEDULES = ("constant", "constant_with_warmup", "cosine")


def lr_factor(name, done, warmup, total):
    """Multiplier of the base lr for the update that follows `done` earlier updates (0 for the first), as
    the official LambdaLR gives after `done` scheduler steps.

    constant:              1
    constant_with_warmup:  done / warmup during the warm-up, then 1
    cosine:                the same warm-up, then 0.5 * (1 + cos(pi * progress)), progress going 0 -> 1
                           over the updates after the warm-up (half a cosine period), never below 0
    """
    if name == "constant":
        return 1.0
    if name not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {name!r}; known: {', '.join(SCHEDULES)}")
    if done < warmup:
        return done / max(1, warmup)  # linear ramp from 0; max(1, .) keeps warmup 0 well defined
    if name == "constant_with_warmup":
        return 1.0
    progress = (done - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


class LrSchedule:
    """Sets the lr of every parameter group of `optimizer` before each update: base_lr x lr_factor."""

    def __init__(self, optimizer, base_lr, name="constant", warmup=0, total=1):
        self.optimizer, self.base_lr, self.name, self.warmup, self.total = optimizer, base_lr, name, warmup, total

    def set_for_update(self, step):
        """Set the lr of update `step` (1-based, the loop's step number) and return it."""
        lr = self.base_lr * lr_factor(self.name, step - 1, self.warmup, self.total)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self):
        return {"name": self.name, "base_lr": self.base_lr, "warmup": self.warmup, "total": self.total}

    def load_state_dict(self, state):
        self.name, self.base_lr = state["name"], state["base_lr"]
        self.warmup, self.total = state["warmup"], state["total"]
