"""minidiff.train.rundir, runlog, trainer and datasets: run folder, checkpoints, log, sample bookkeeping, data (CPU, <2 s).

Covers: a half-written checkpoint is never the latest; a checkpoint round trip restores weights, optimizer and
RNG; log.csv is cut back to the resumed step; loss.png is drawn; the global batch is the same for any number
of processes; every item is seen once per epoch; the official CSV column order; the official paired crop
rules; per-(seed, item, epoch) determinism of a sample.  Run: python -m pytest tests/test_trainer.py -q
"""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from minidiff.errors import NonFiniteError, UsageError
from minidiff.train import datasets, rundir, runlog, seeding, trainer


def test_checkpoints_are_atomic_and_round_trip(tmp_path):
    dist = trainer.Dist()
    run = rundir.RunDir(tmp_path / "run", "plugin", "deblur", False, dist)
    run.check({"seed": 1})
    run.start({"seed": 1}, data={"sha256": "x"})
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    torch.manual_seed(123)
    run.save_checkpoint(5, model.state_dict(), opt.state_dict(), data_position=20)
    rng_after_save = torch.rand(3)
    # a writer killed mid-way leaves a hidden temporary; a folder without state.json is not finished either
    (run.ckpt_dir / ".step-000009.abc").mkdir()
    (run.ckpt_dir / ".step-000009.abc" / "model.safetensors").write_bytes(b"half")
    (run.ckpt_dir / "step-000007").mkdir()
    assert run.latest_checkpoint().name == "step-000005"
    ckpt = run.load_checkpoint(run.latest_checkpoint())
    assert torch.equal(torch.rand(3), rng_after_save)  # RNG restored to its state at the save
    assert ckpt.step == 5 and ckpt.data_position == 20
    assert all(torch.equal(ckpt.tensors[k], v) for k, v in model.state_dict().items())
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    fresh.load_state_dict(ckpt.optimizer)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    again = rundir.RunDir(tmp_path / "run", "plugin", "deblur", True, dist)
    again.check({"seed": 1}, fixed=("seed",))
    again.start({"seed": 1})  # removes the stale temporary
    assert not (run.ckpt_dir / ".step-000009.abc").exists()
    with pytest.raises(UsageError, match="seed was 1"):
        rundir.RunDir(tmp_path / "run", "plugin", "deblur", True, dist).check({"seed": 2}, fixed=("seed",))


def test_log_is_cut_back_on_resume_and_plotted(tmp_path):
    dist = trainer.Dist()
    log = runlog.CsvLog(tmp_path / "log.csv", ["step", "loss"], 0, dist)
    for s in range(1, 8):
        log.write({"step": s, "loss": 1.0 / s})
    log.close()
    runlog.CsvLog(tmp_path / "log.csv", ["step", "loss"], 4, dist).close()
    assert [s for s, _ in runlog.read_log(tmp_path / "log.csv")] == [1, 2, 3, 4]
    runlog.plot_loss(tmp_path / "log.csv", tmp_path / "loss.png")
    assert Image.open(tmp_path / "loss.png").size == (800, 400)
    with pytest.raises(NonFiniteError, match="at step 3: .*no checkpoint yet"):
        rundir.check_finite(float("nan"), 3, rundir.RunDir(tmp_path, "plugin", "x", False, dist))


def test_global_batch_independent_of_processes_and_epochs_cover_the_data():
    for world, accum in ((1, 1), (1, 4), (2, 1), (2, 2), (4, 1)):
        got = []
        for rank in range(world):
            micro = trainer.rank_micro_batches(3, 8, accum, trainer.Dist(rank=rank, world_size=world))
            assert len(micro) == accum and all(len(m) == 8 // world // accum for m in micro)
            got += [n for m in micro for n in m]
        assert got == list(range(16, 24))
    items = [seeding.sample_item(0, 5, n) for n in range(10)]
    assert sorted(i for i, e in items[:5]) == list(range(5)) and {e for _, e in items[5:]} == {1}
    assert [i for i, _ in items[:5]] != [i for i, _ in items[5:]]  # each epoch has its own order


def test_csv_is_gt_first_and_paired_folders_match(tmp_path):
    for sub in ("input", "gt"):
        (tmp_path / sub).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / sub / "a.png")
    (tmp_path / "t.csv").write_text("image,conditioning_image\ngt/a.png,input/a.png\n")
    pairs = datasets.list_pairs(str(tmp_path / "t.csv"), str(tmp_path))
    assert pairs == [(str(tmp_path / "input" / "a.png"), str(tmp_path / "gt" / "a.png"))]
    assert datasets.list_pairs(str(tmp_path)) == pairs


def test_paired_augment_follows_the_official_rules():
    wide = Image.fromarray(np.arange(40 * 100 * 3, dtype=np.uint32).reshape(40, 100, 3).astype(np.uint8))
    sizes = set()
    for seed in range(40):
        a, b = datasets.paired_augment(wide, wide.copy(), 64, random.Random(seed))
        assert np.array_equal(np.asarray(a), np.asarray(b))  # the same crop and flip on both
        sizes.add(a.size)
    assert sizes == {(100, 40), (40, 40)}  # a side below 64: a square of the short side, or nothing
    big = Image.new("RGB", (100, 90))
    assert {datasets.paired_augment(big, big, 64, random.Random(s))[0].size for s in range(40)} == \
        {(100, 90), (64, 64)}


def test_a_sample_is_a_function_of_seed_item_and_epoch(tmp_path):
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png")
    pairs = datasets.list_pairs(str(tmp_path), degrade="deblur")
    data = datasets.PairDataset(pairs, 32, seed=7, augment=True, degrade="deblur")
    a, b = data[4], data[4]
    assert all(torch.equal(x, y) for x, y in zip(a[:2], b[:2])) and a[0].shape == (3, 32, 32)
    assert a[0].min() >= -1 and a[0].max() <= 1 and not torch.equal(a[0], a[1])  # degraded != clean
    item, epoch = seeding.sample_item(7, 3, 4)
    again = datasets.PairDataset(pairs, 32, seed=7, augment=True, degrade="deblur").load(item, epoch)
    assert torch.equal(datasets.to_training_tensor(again[0]), a[0])  # any process, the same sample
    later = data.load(item, epoch + 1)  # another epoch: another degradation (and augmentation)
    assert not np.array_equal(np.asarray(later[0]), np.asarray(again[0]))
