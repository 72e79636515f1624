"""The small model family (issue 18): the recipe end to end at --quick sizes, its exact resume, the shipped
format (SD single file with the latent scale in its metadata, manifest hashes checked at load), --model.

The quick recipe trains on examples/ (4 CC0 photos in the repository) so that nothing is downloaded; it
proves the code paths, not the quality (tests/test_small_quality.py asserts the shipped family's figures).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minidiff.family import choose_model, small_paths, verify_small
from minidiff.errors import CheckpointError
from minidiff.io.loading import load_stable_diffusion
from minidiff.train import small

ROOT = Path(__file__).resolve().parents[1]
RECIPE = [sys.executable, str(ROOT / "tools" / "train_small.py")]


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, **kw)


@pytest.fixture(scope="module")
def quick_family(tmp_path_factory):
    """The --quick recipe, end to end, shipped into <tmp>/checkpoints/small."""
    tmp = tmp_path_factory.mktemp("small")
    ship = tmp / "checkpoints" / "small"
    proc = run(RECIPE + ["--data", "examples", "--output", str(tmp / "run"), "--quick", "--ship", str(ship),
                         "--threads", "1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp


@pytest.mark.slow
def test_quick_recipe_writes_every_stage_and_ships_a_verified_family(quick_family):
    run_dir, ship = quick_family / "run", quick_family / "checkpoints" / "small"
    for stage in ("vae", "decoder", "text", "words", "unet"):  # each a training run of the trainer's machinery
        assert (run_dir / stage / "log.csv").is_file() and (run_dir / stage / "loss.png").is_file()
        assert list((run_dir / stage / "checkpoints").glob("step-*"))
    assert (run_dir / "unet" / "samples.png").is_file()
    naming = json.loads((run_dir / "text" / "heldout.json").read_text())
    assert 0.0 <= naming["heldout"] <= 1.0 and naming["sentences"] > 0
    words = json.loads((run_dir / "words" / "heldout.json").read_text())
    assert 0.0 <= words["heldout"] <= 1.0 and words["null_context_relative_change"] >= 0.0
    # the words stage's text tower is the one shipped inside sd.safetensors (fp16)
    tower = load_file(run_dir / "words" / "text.safetensors")
    shipped = load_file(ship / "sd.safetensors")
    for k, v in tower.items():
        assert torch.equal(shipped["cond_stage_model.transformer." + k], v.half()), k
    for task in small.QUICK_TASKS:
        assert (ship / "plugins" / f"{task}.safetensors").is_file()
    manifest = json.loads((ship / "manifest.json").read_text())
    assert set(manifest["files"]) == {"sd.safetensors", "clip_vision.safetensors", "selector.safetensors",
                                      *(f"plugins/{t}.safetensors" for t in small.QUICK_TASKS)}
    verify_small(ship)  # every hash matches
    # the shipped form is fp16, and the latent scale travels in the SD file's metadata
    assert all(t.dtype == torch.float16 for t in load_file(ship / "sd.safetensors").values())
    latents = small.load_latents(run_dir / "latents.safetensors")
    sd = load_stable_diffusion(str(ship / "sd.safetensors"))
    assert sd.vae.cfg.latent_scale == pytest.approx(latents[2], rel=1e-12)
    assert sd.unet.cfg.model_channels == small.SMALL_UNET.model_channels
    # the decoder stage trained the decoder side only: the encoder (hence the latents) is the vae stage's
    vae, tuned = load_file(run_dir / "vae" / "vae.safetensors"), load_file(run_dir / "decoder" / "vae.safetensors")
    decoder_side = [k for k in vae if k.startswith(("decoder.", "post_quant_conv."))]
    assert decoder_side and all(torch.equal(vae[k], tuned[k]) for k in vae if k not in decoder_side)
    assert any(not torch.equal(vae[k], tuned[k]) for k in decoder_side)
    for k, v in tuned.items():  # and the shipped VAE is the decoder stage's
        assert torch.equal(shipped["first_stage_model." + k], v.half()), k


@pytest.mark.slow
def test_start_from_a_shipped_family_trains_only_what_it_lacks(quick_family, tmp_path):
    source = quick_family / "checkpoints" / "small"
    ship = tmp_path / "ship"
    proc = run(RECIPE + ["--data", "examples", "--output", str(tmp_path / "run"), "--quick", "--threads", "1",
                         "--start-from", str(source), "--ship", str(ship)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    for stage in ("vae", "text", "unet"):  # taken as finished: never trained here
        assert not (tmp_path / "run" / stage / "log.csv").exists()
    for stage in ("decoder", "words"):  # the stages this recipe adds ran on top
        assert (tmp_path / "run" / stage / "log.csv").is_file()
    a, b = load_file(source / "sd.safetensors"), load_file(ship / "sd.safetensors")
    moved = ("first_stage_model.decoder.", "first_stage_model.post_quant_conv.", "cond_stage_model.")
    for k in a:  # UNet and VAE encoder as shipped; the decoder side and the text tower moved
        if not k.startswith(moved):
            assert torch.equal(a[k], b[k]), k
    for prefix in moved:
        assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix)), prefix
    scale = load_stable_diffusion(str(source / "sd.safetensors")).vae.cfg.latent_scale
    assert load_stable_diffusion(str(ship / "sd.safetensors")).vae.cfg.latent_scale == scale
    for path in (source / "plugins").glob("*.safetensors"):
        x, y = load_file(path), load_file(ship / "plugins" / path.name)
        assert all(torch.equal(x[k], y[k]) for k in x)
    verify_small(ship)


def test_start_from_refuses_a_bad_family_and_resume(tmp_path):
    proc = run(RECIPE + ["--data", "examples", "--output", str(tmp_path / "run"), "--quick",
                         "--start-from", str(tmp_path / "nope")])
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--start-from" in proc.stderr
    assert not (tmp_path / "run").exists()
    proc = run(RECIPE + ["--data", "examples", "--output", str(tmp_path / "run"), "--quick", "--resume",
                         "--start-from", "checkpoints/small"])
    assert proc.returncode == 2 and "--resume" in proc.stderr


@pytest.mark.slow
def test_sample_runs_the_small_family_by_default_and_names_it(quick_family, tmp_path):
    env = {**os.environ, "MINIDIFF_CHECKPOINTS": str(quick_family / "checkpoints")}
    proc = run([sys.executable, "tools/sample.py", "--input", "examples/coffee-rain.jpg", "--task", "lowlight",
                "--steps", "2", "--output", str(tmp_path), "--no-progress"], env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "small family" in proc.stderr  # auto's one notice line
    record = json.loads((tmp_path / "coffee-rain.json").read_text())
    assert record["model"] == "small" and record["base_model"]["id"] == "minidiff-small"
    working = json.loads((quick_family / "checkpoints" / "small" / "manifest.json").read_text())["working_size"]
    assert min(record["processed_size"]) == working  # the family's working size (the demo rule)


@pytest.mark.slow
def test_a_corrupt_shipped_file_is_refused_in_one_line(quick_family, tmp_path):
    bad = tmp_path / "checkpoints"
    shutil.copytree(quick_family / "checkpoints", bad)
    target = bad / "small" / "plugins" / f"{small.QUICK_TASKS[0]}.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    env = {**os.environ, "MINIDIFF_CHECKPOINTS": str(bad)}
    proc = run([sys.executable, "tools/sample.py", "--input", "examples/coffee-rain.jpg", "--task", "lowlight",
                "--model", "small", "--steps", "1", "--output", str(tmp_path / "out")], env=env)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(target.name) in lines[0] and "corrupt" in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_a_stage_resumed_after_a_kill_is_bit_identical(quick_family, tmp_path):
    """A kill -9 after the step-2 checkpoint of the VAE stage: what is on disk then is the run folder up to
    that checkpoint. Resuming from it must give the uninterrupted run's weights, bit for bit."""
    full = quick_family / "run"
    cut = tmp_path / "run"
    cut.mkdir()
    shutil.copy(full / "recipe.json", cut / "recipe.json")
    shutil.copytree(full / "vae", cut / "vae")
    (cut / "vae" / "vae.safetensors").unlink()
    for ckpt in (cut / "vae" / "checkpoints").glob("step-*"):
        if ckpt.name != "step-000002":
            shutil.rmtree(ckpt)
    cfg = json.loads((cut / "vae" / "config.json").read_text())  # the hashes of what is left
    cfg["checkpoints"] = {k: v for k, v in cfg["checkpoints"].items() if k == "step-000002"}
    (cut / "vae" / "config.json").write_text(json.dumps(cfg))
    proc = run(RECIPE + ["--data", "examples", "--output", str(cut), "--quick", "--resume", "--until", "vae",
                         "--threads", "1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = load_file(full / "vae" / "vae.safetensors"), load_file(cut / "vae" / "vae.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_data_is_refused_before_training(tmp_path):
    proc = run(RECIPE + ["--data", str(tmp_path / "nope"), "--output", str(tmp_path / "run"), "--quick"])
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "small_data.py" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_an_existing_recipe_needs_resume(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.json").write_text("{}")
    proc = run(RECIPE + ["--data", "examples", "--output", str(tmp_path / "run"), "--quick"])
    assert proc.returncode == 2 and "--resume" in proc.stderr


def test_auto_takes_the_small_family_only_without_the_published_weights(tmp_path):
    assert choose_model("auto", str(tmp_path), ("sd14", "clip", "plugins")) == ("published", None)
    folder = tmp_path / "small"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"files": {}}))
    model, notice = choose_model("auto", str(tmp_path), ("sd14", "clip", "plugins"))
    assert model == "small" and "download.py" in notice
    assert choose_model("published", str(tmp_path), ("sd14",)) == ("published", None)


def test_verify_small_names_a_missing_or_altered_file(tmp_path):
    (tmp_path / "sd.safetensors").write_bytes(b"abc")
    files = {"sd.safetensors": {"sha256": "0" * 64, "bytes": 3},
             "plugins/derain.safetensors": {"sha256": "0" * 64, "bytes": 1}}
    (tmp_path / "manifest.json").write_text(json.dumps({"files": files}))
    with pytest.raises(CheckpointError, match="sd.safetensors: corrupt"):
        verify_small(str(tmp_path), ("sd",))
    with pytest.raises(CheckpointError, match="derain.safetensors: missing"):
        verify_small(str(tmp_path), ("plugins",))
    assert small_paths("x")["clip"] == os.path.join("x", "clip_vision.safetensors")


def test_latent_scale_is_one_over_the_std_of_posterior_samples():
    mean = torch.randn(64, 4, 4, 4) * 3.0
    logvar = torch.full_like(mean, -20.0)  # (almost) deterministic posterior: the std is that of the means
    assert small.latent_scale(mean, logvar, seed=0) == pytest.approx(1 / float(mean.std()), rel=1e-4)


def test_vae_loss_parts_and_the_batches_are_pure_functions_of_their_numbers():
    from PIL import Image
    photos = [Image.new("RGB", (80, 72), (10 * k, 50, 90)) for k in range(3)]
    a, na = small.vae_batch(photos, [0, 5], 64, seed=1)
    b, nb = small.vae_batch(photos, [0, 5], 64, seed=1)
    assert torch.equal(a, b) and torch.equal(na, nb) and a.shape == (2, 3, 64, 64) and na.shape == (2, 4, 8, 8)
    vae = small.new_vae(0)
    loss, parts = small.vae_loss(vae, a, na)
    expected = parts["l1"] + small.GRAD_WEIGHT * parts["grad"] + small.KL_WEIGHT * parts["kl"]
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)


def test_text_stage_batches_corrupt_word_tokens_only_and_are_pure_functions_of_the_step():
    """The text stage's batch: drawn by (seed, step), with about TOKEN_NOISE of the word tokens replaced by
    random ones and the start, end and padding tokens untouched; the same step gives the same loss."""
    from minidiff.models.tokenizer import CLIPTokenizer
    from minidiff.train.instructions import load_corpus
    from minidiff.train.seeding import generator_for
    corpus = load_corpus().part("train")
    sentences, labels = small.text_examples(corpus, seed=0, combinations=20)
    assert labels.shape == (len(sentences), len(corpus.tasks)) and set(labels.unique().tolist()) <= {0.0, 1.0}
    assert len(sentences) == len(corpus.labelled()) + 20
    ids = CLIPTokenizer()(sentences)  # [N, 77]
    noisy = small.corrupt_tokens(ids, generator_for(0, "text", 1))
    special = ids >= 49406  # start, end of text and the padding (end of text repeated)
    assert torch.equal(noisy[special], ids[special])
    changed = (noisy != ids).sum().item() / (~special).sum().item()
    assert 0.10 < changed < 0.20  # TOKEN_NOISE = 0.15 (a random id may equal the old one: rarely)
    text, _ = small.random_towers()
    namer = small.TaskNamer(text.requires_grad_(True), corpus.tasks)
    a = small.text_loss(namer, ids, labels, 8, seed=0, step=3)
    b = small.text_loss(namer, ids, labels, 8, seed=0, step=3)
    c = small.text_loss(namer, ids, labels, 8, seed=0, step=4)
    assert float(a[0]) == float(b[0]) and a[1] == b[1] and float(a[0]) != float(c[0])
