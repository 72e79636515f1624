"""The training recipe of issue 20: the face-CSV trap, the training length (--epochs), the lr schedules
(checked against diffusers.optimization), --resume-from, --validation-image, TF32 in the record, and
corrupt checkpoints on --resume. tools/train.py runs with --fake-weights on tiny synthetic photos (CPU).
Run: python -m pytest tests/test_train_recipe.py -q
"""
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "tools", "train.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
TINY = ["--fake-weights", "--resolution=32", "--batch-size=2", "--val-pairs=0", "--num-workers=0",
        "--lr=1e-3", "--validate-every=0"]


def run(*args):
    return subprocess.run([sys.executable, TRAIN, *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=ENV)


def train_tool():
    spec = importlib.util.spec_from_file_location("train_tool", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """6 synthetic 48x48 'photos' (smooth colour ramps plus a block), clean only."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:48, 0:48] / 48
    for i in range(6):
        x = np.stack([0.5 + 0.4 * np.sin(2 * np.pi * (rng.uniform(1, 3) * xx + rng.uniform(1, 3) * yy))
                      for _ in range(3)], axis=-1)
        a, b = rng.integers(0, 32, 2)
        x[a:a + 12, b:b + 12] = rng.uniform(0, 1, 3)
        Image.fromarray((x * 255).astype(np.uint8)).save(folder / f"p{i}.png")
    return str(folder)


def same_photo_csv(folder, photos, copies=False):
    """The official face.csv's shape: every row names one photo as ground truth and input (or, copies=True,
    a byte-identical copy of it as input)."""
    rows = ["image,conditioning_image"]
    for i in range(6):
        inp = f"p{i}.png"
        if copies:
            os.makedirs(folder / "copies", exist_ok=True)
            shutil.copy(os.path.join(photos, inp), folder / "copies" / inp)
            inp = str(folder / "copies" / inp)  # absolute: joined to --data-root it stays itself
        rows.append(f"p{i}.png,{inp}")
    (folder / "same.csv").write_text("\n".join(rows) + "\n")
    return str(folder / "same.csv")


# ---------------------------------------------------------------------------------------------------------
# 1. the face trap
# ---------------------------------------------------------------------------------------------------------

def test_identical_pairs_by_path_and_by_content(photos, tmp_path):
    from minidiff.train.datasets import identical_pairs, list_pairs
    p = [os.path.join(photos, f"p{i}.png") for i in range(3)]
    shutil.copy(p[0], tmp_path / "copy.png")
    os.symlink(p[1], tmp_path / "link.png")
    pairs = [(p[0], p[0]), (str(tmp_path / "copy.png"), p[0]), (str(tmp_path / "link.png"), p[1]),
             (p[2], p[0]), (p[1], p[2])]
    assert identical_pairs(pairs) == 3
    assert identical_pairs(list_pairs(same_photo_csv(tmp_path, photos, copies=True), photos)) == 6


def test_face_task_degrades_the_inputs_and_says_so(photos, tmp_path):
    from minidiff.train.datasets import PairDataset
    csv_path = same_photo_csv(tmp_path, photos)
    out = tmp_path / "face"
    r = run(*TINY, "--task=face", "--data", csv_path, "--data-root", photos, "--output", out, "--steps=1")
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stdout.splitlines() if line.startswith("--task face:")]
    assert len(said) == 1 and "6 of 6 pairs" in said[0] and "face degradation" in said[0], r.stdout
    saved = json.loads((out / "config.json").read_text())["settings"]
    assert saved["degrade"] == "face"
    # what the run trained on: the input of a sample is the degraded photo, not the ground truth
    inp, gt = PairDataset([(os.path.join(photos, "p0.png"),) * 2], 32, 42, degrade="face").load(0, 0)
    assert np.abs(np.asarray(inp, float) - np.asarray(gt, float)).mean() > 1.0


def test_other_tasks_refuse_identical_pairs_naming_the_count(photos, tmp_path, capsys):
    csv_path = same_photo_csv(tmp_path, photos, copies=True)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code = train_tool().main([*TINY, "--task=derain", "--data", csv_path, "--data-root", photos,
                              "--output", str(tmp_path / "out"), "--steps=1"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "6 of 6 pairs" in err and "--degrade" in err and err.startswith("error: ")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


# ---------------------------------------------------------------------------------------------------------
# 3. lr schedules: diffusers' formulas, update by update
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parity
@pytest.mark.parametrize("name,warmup,total", [("constant", 500, 40), ("constant_with_warmup", 7, 40),
                                               ("cosine", 7, 40), ("cosine", 0, 13), ("constant_with_warmup", 0, 5)])
def test_lr_schedule_matches_diffusers(name, warmup, total):
    """The lr of every update equals the one the official run's diffusers get_scheduler gives (same base lr,
    same number of scheduler steps before it). Under "constant" the 500 warm-up steps are ignored there too."""
    import torch
    optimization = pytest.importorskip("diffusers.optimization")
    from minidiff.train.lr_schedule import LrSchedule
    ours_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    theirs_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    ours = LrSchedule(ours_opt, 3e-4, name, warmup, total)
    theirs = optimization.get_scheduler(name, theirs_opt, num_warmup_steps=warmup, num_training_steps=total)
    for step in range(1, total + 1):
        assert ours.set_for_update(step) == pytest.approx(theirs_opt.param_groups[0]["lr"], rel=1e-12, abs=0)
        assert ours_opt.param_groups[0]["lr"] == ours.set_for_update(step)
        theirs_opt.step()
        theirs.step()
    if name == "cosine":  # down to 0 at the end: the last update's lr is the smallest, above 0
        assert 0 < ours.set_for_update(total) < ours.set_for_update(total - 1)


# ---------------------------------------------------------------------------------------------------------
# 2. training length
# ---------------------------------------------------------------------------------------------------------

def test_default_length_is_the_official_100_epochs(photos, tmp_path):
    tool = train_tool()
    out = str(tmp_path / "len")
    # 6 photos, 2 held out -> 4 training pairs; global batch 3 -> ceil(4 / 3) = 2 updates per epoch
    args = tool.parse_args(["--fake-weights", "--task=deblur", "--degrade=deblur", "--data", photos,
                            "--output", out, "--batch-size=3", "--val-pairs=2", "--num-workers=0"])
    tool.prepare(args)
    assert (args.epochs, args.steps) == (100, 200)
    args = tool.parse_args(["--fake-weights", "--task=deblur", "--degrade=deblur", "--data", photos,
                            "--output", out, "--batch-size=3", "--val-pairs=2", "--epochs=7"])
    tool.prepare(args)
    assert args.steps == 14
    assert not os.path.exists(out)
    with pytest.raises(SystemExit):  # exclusive flags: argparse's one line, exit 2
        tool.parse_args(["--task=x", "--data=d", "--output=o", "--steps=3", "--epochs=2"])


def test_start_line_says_updates_per_device_batch_and_lr(photos, tmp_path):
    r = run(*TINY, "--task=deblur", "--degrade=deblur", "--data", photos, "--output", tmp_path / "e",
            "--epochs=2", "--scale-lr", "--checkpoint-every=100")
    assert r.returncode == 0, r.stderr
    line = r.stdout.splitlines()[0]
    # 6 pairs at global batch 2: 3 updates per epoch; --scale-lr: 1e-3 x 2
    assert "6 updates (2 epochs x 3 updates)" in line and "per-device batch 2" in line, line
    assert "effective lr 0.002 (0.001 x global batch 2 (--scale-lr))" in line, line
    saved = json.loads((tmp_path / "e" / "config.json").read_text())
    assert saved["settings"]["steps"] == 6 and saved["tf32_matmul"] is False and saved["effective_lr"] == 2e-3


# ---------------------------------------------------------------------------------------------------------
# 3. schedules and named checkpoints on resume; validation photos
# ---------------------------------------------------------------------------------------------------------

def base(photos, out, *extra):
    return [*TINY, "--task=deblur", "--degrade=deblur", "--data", photos, "--output", out, *extra]


@pytest.fixture(scope="module")
def cosine_run(photos, tmp_path_factory):
    """Uninterrupted: 6 updates, cosine with 2 warm-up updates, a checkpoint after every update."""
    out = tmp_path_factory.mktemp("cos") / "run"
    r = run(*base(photos, out, "--steps=6", "--checkpoint-every=1", "--lr-scheduler=cosine",
                  "--lr-warmup-steps=2"))
    assert r.returncode == 0, r.stderr
    return out


def log_rows(folder):
    with open(folder / "log.csv") as f:
        return [line.split(",")[:3] for line in f.read().splitlines()[1:]]


def test_cosine_lr_in_the_log_and_restored_on_resume(cosine_run, photos, tmp_path):
    from safetensors.torch import load_file
    from minidiff.train.lr_schedule import lr_factor
    lrs = [float(row[2]) for row in log_rows(cosine_run)]
    assert lrs == pytest.approx([1e-3 * lr_factor("cosine", k, 2, 6) for k in range(6)], rel=1e-5)
    assert lrs[0] == 0 and lrs[2] == pytest.approx(1e-3)  # warm-up from 0, then the cosine from the top
    # resume from the named step-3 checkpoint: the same lrs, losses and weights as the uninterrupted run
    copy = tmp_path / "run"
    shutil.copytree(cosine_run, copy)
    r = run(*base(photos, copy, "--steps=6", "--checkpoint-every=1", "--lr-scheduler=cosine",
                  "--lr-warmup-steps=2", "--resume-from=step-000003"))
    assert r.returncode == 0, r.stderr
    assert f"resuming from {copy / 'checkpoints' / 'step-000003'}: step 3" in r.stdout, r.stdout
    assert log_rows(copy) == log_rows(cosine_run)
    a, b = load_file(copy / "deblur.safetensors"), load_file(cosine_run / "deblur.safetensors")
    assert all(bool((a[k] == b[k]).all()) for k in a)
    # another length would change the cosine of the updates left: refused
    r = run(*base(photos, copy, "--steps=9", "--lr-scheduler=cosine", "--lr-warmup-steps=2", "--resume"))
    assert r.returncode == 2 and "cosine schedule" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_validation_images_beside_the_paired_sheet(photos, tmp_path):
    out = tmp_path / "v"
    r = run(*base(photos, out, "--steps=2", "--val-pairs=2", "--validate-every=2", "--val-steps=2",
                  "--validation-image", os.path.join(photos, "p0.png"), os.path.join(photos, "p1.png")))
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out / "val")) == ["step-000002-photos.png", "step-000002.png"]
    sheet = Image.open(out / "val" / "step-000002-photos.png")
    assert sheet.size == (2 * 32, 2 * (32 + 14))  # two rows of input | output at --resolution
    r = run(*base(photos, tmp_path / "w", "--steps=2", "--validation-image", tmp_path / "nope.png"))
    assert r.returncode == 2 and "nope.png" in r.stderr and not (tmp_path / "w").exists()


# ---------------------------------------------------------------------------------------------------------
# corrupt checkpoints on --resume (issue 20 section 3)
# ---------------------------------------------------------------------------------------------------------

def damage(folder, how):
    """Break checkpoints/step-000006 of a copied run: truncate a file or flip one byte of the weights."""
    ckpt = folder / "checkpoints" / "step-000006"
    if how == "flip":
        data = bytearray((ckpt / "model.safetensors").read_bytes())
        data[-5] ^= 0x01  # a byte of a tensor's data: the file still parses
        (ckpt / "model.safetensors").write_bytes(bytes(data))
        return ckpt / "model.safetensors"
    path = ckpt / how
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


@pytest.mark.parametrize("how", ["trainer.pt", "state.json", "flip"])
def test_resume_skips_a_corrupt_latest_checkpoint(cosine_run, photos, tmp_path, how):
    from safetensors.torch import load_file
    copy = tmp_path / "run"
    shutil.copytree(cosine_run, copy)
    bad = damage(copy, how)
    r = run(*base(photos, copy, "--steps=6", "--checkpoint-every=1", "--lr-scheduler=cosine",
                  "--lr-warmup-steps=2", "--resume"))
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stdout.splitlines() if "bad checkpoint" in line]
    assert len(said) == 1 and str(bad) in said[0] and "recorded" in said[0], r.stdout
    assert f"resuming from {copy / 'checkpoints' / 'step-000005'}: step 5" in r.stdout
    # step 6 trained again from the intact step 5: the uninterrupted run's weights, and an intact record
    a, b = load_file(copy / "deblur.safetensors"), load_file(cosine_run / "deblur.safetensors")
    assert all(bool((a[k] == b[k]).all()) for k in a)
    # the rewritten step 6 has a fresh record (trainer.pt's pickle bytes may differ; the weights do not)
    from minidiff.io.files import sha256_file
    ours = json.loads((copy / "config.json").read_text())["checkpoints"]["step-000006"]
    theirs = json.loads((cosine_run / "config.json").read_text())["checkpoints"]["step-000006"]
    assert ours == {f: sha256_file(copy / "checkpoints" / "step-000006" / f) for f in ours}
    assert ours["model.safetensors"] == theirs["model.safetensors"]


def test_corrupt_checkpoint_without_a_recorded_hash_and_named(cosine_run, photos, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(cosine_run, copy)
    damage(copy, "trainer.pt")
    config = json.loads((copy / "config.json").read_text())
    del config["checkpoints"]["step-000006"]  # e.g. killed between the rename and the record
    (copy / "config.json").write_text(json.dumps(config))
    flags = ["--steps=6", "--checkpoint-every=1", "--lr-scheduler=cosine", "--lr-warmup-steps=2"]
    code = train_tool().main(base(photos, str(copy), *flags, "--resume-from=step-000006"))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: --resume-from") and "unreadable" in err, err
    r = run(*base(photos, copy, *flags, "--resume"))
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stdout.splitlines() if "bad checkpoint" in line]
    assert len(said) == 1 and "step-000006: unreadable" in said[0], r.stdout
    assert "Traceback" not in r.stderr
