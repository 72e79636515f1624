"""A training run's log: log.csv (a fixed header, flushed per row, cut back to the resumed step), its loss
plot (loss.png, drawn with Pillow: the loss and its bias-corrected moving average) and the progress bar
over update steps. Rank 0 writes; the other ranks get do-nothing stand-ins. Used with
minidiff/train/rundir.py by every training tool.
"""
import csv
import os
from pathlib import Path


class CsvLog:
    """log.csv with a fixed header. On resume from `start_step`, rows after that step are dropped (they
    belong to the lost part of the interrupted run), so the log matches the weights. Rank 0 writes."""

    def __init__(self, path, fields, start_step, dist):
        self.path, self.fields, self.file = Path(path), list(fields), None
        if not dist.is_main:
            return
        rows = []
        if self.path.exists():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                rows = [r for r in reader if r.get("step", "").isdigit() and int(r["step"]) <= start_step]
        tmp = self.path.with_name("." + self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)
        self.file = open(self.path, "a", newline="")
        self.writer = csv.DictWriter(self.file, self.fields, extrasaction="ignore")

    def write(self, row):
        if self.file is None:
            return
        self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def read_log(path, column="loss"):
    """[(step, value)] for the rows of log.csv where `column` is set."""
    with open(path, newline="") as f:
        return [(int(r["step"]), float(r[column])) for r in csv.DictReader(f) if r.get(column)]


def plot_loss(log_path, png_path, smooth=0.95, size=(800, 400)):
    """Draw the loss of log.csv (thin, grey) and its exponential moving average (bold, blue) with Pillow."""
    from PIL import Image, ImageDraw, ImageFont
    from minidiff.io.imageio import save_png_atomic
    points = read_log(log_path)
    w, h = size
    left, right, top, bottom = 70, 20, 30, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((left, 8), f"loss (grey) and its moving average (blue, {smooth})", fill="black", font=font)
    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    if points:
        steps = [s for s, _ in points]
        values = [v for _, v in points]
        avg, ema = [], 0.0
        for k, v in enumerate(values, start=1):
            ema = smooth * ema + (1 - smooth) * v
            avg.append(ema / (1 - smooth ** k))  # bias-corrected, as Adam's moments: no pull towards 0
        lo, hi = min(values), max(values)
        hi = lo + 1e-12 if hi <= lo else hi
        s0, s1 = steps[0], max(steps[-1], steps[0] + 1)

        def xy(s, v):
            x = left + (s - s0) / (s1 - s0) * (w - left - right)
            return x, top + (hi - v) / (hi - lo) * (h - top - bottom)
        for k in range(5):  # y ticks, bottom to top; x ticks at the two ends
            v = lo + k / 4 * (hi - lo)
            draw.text((4, xy(s0, v)[1] - 6), f"{v:.4g}", fill="black", font=font)
        draw.text((left, h - bottom + 6), str(s0), fill="black", font=font)
        draw.text((w - right - 40, h - bottom + 6), str(steps[-1]), fill="black", font=font)
        draw.text(((w - 30) // 2, h - bottom + 22), "step", fill="black", font=font)
        if len(points) > 1:
            draw.line([xy(s, v) for s, v in zip(steps, values)], fill=(170, 170, 170), width=1)
            draw.line([xy(s, v) for s, v in zip(steps, avg)], fill=(30, 80, 200), width=3)
    save_png_atomic(img, png_path)


def progress(total, initial, dist, desc="train"):
    """tqdm bar over update steps on rank 0 (disabled elsewhere); set its postfix to loss and images/s."""
    from tqdm import tqdm
    quiet = {} if dist.is_main else {"disable": True}  # rank 0 leaves it to tqdm (TQDM_DISABLE=1 works)
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, **quiet)
