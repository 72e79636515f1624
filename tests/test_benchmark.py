"""tools/bench/benchmark.py without full-size networks: the CPU description, the alternating timer, the table's
ratio and GEMM-peak arithmetic, and a whole `main()` run (with --json) on stand-in benchmarks.

    python -m pytest tests/test_benchmark.py -q        # ~10 s on one thread (diffusers import, FLOP count)
"""
import json

import pytest
import torch

import helpers  # noqa: F401  (tools/ on sys.path)
import benchmark

CPUINFO = ("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
           "processor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
MACHINE = {"cpu": benchmark.cpu_info(CPUINFO), "threads": 2, "python": "3.11", "load_start": 0.1,
           "load_end": 2.5,
           "versions": {"torch": "2.13.0", "diffusers": "0.35.2", "transformers": "4.57.6"}}


def test_cpu_info_reads_model_count_and_bf16_flags():
    cpu = benchmark.cpu_info(CPUINFO)
    assert (cpu["model"], cpu["logical_cpus"], cpu["native_bf16"]) == ("Test CPU 9000", 2, True)
    assert cpu["flags"] == {"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_bf16": False,
                            "amx_tile": False}
    assert not benchmark.cpu_info(CPUINFO.replace(" avx512_bf16", ""))["native_bf16"]


def test_alternate_warms_both_then_takes_turns():
    calls = []
    fns = {lib: (lambda lib=lib: calls.append(lib) or lib) for lib in ("minidiff", "diffusers")}
    times, cpu, last = benchmark.alternate(fns, runs=3, warmup=1)
    # warm-up A B, then A B / B A / A B: the first to go alternates
    assert calls == ["minidiff", "diffusers"] + ["minidiff", "diffusers", "diffusers", "minidiff",
                                                 "minidiff", "diffusers"]
    assert [len(t) for t in (*times.values(), *cpu.values())] == [3, 3, 3, 3]
    assert last == {"minidiff": "minidiff", "diffusers": "diffusers"}
    assert benchmark.median([3.0, 1.0, 2.0]) == 2.0 and benchmark.median([4.0, 1.0]) == 4.0


def fake_rows():
    """A UNet row of 800 GFLOP in 4 s / 5 s, a memory row, and a row without a diffusers figure."""
    return [benchmark.row("unet", "UNet forward 64x64 latents, 77 tokens, fp32, warm median (s)",
                          {"minidiff": 4.0, "diffusers": 5.0}, dtype="fp32", flops=800e9),
            benchmark.row("restore", "restore peak RSS above start (MiB)",
                          {"minidiff": 3000.0, "diffusers": 4000.0}, unit="MiB", dtype="fp32"),
            benchmark.row("vae", "VAE decode 512x512, bf16, warm median (s)", {"minidiff": 2.5},
                          dtype="bf16")]


def test_table_ratio_and_gemm_share():
    gemm = {"fp32": 400.0, "bf16": 800.0}  # GFLOP/s
    rows = fake_rows()
    assert benchmark.ratio(rows[0]) == 0.8 and benchmark.ratio(rows[2]) is None
    # 800 GFLOP / 4 s = 200 GFLOP/s = 50% of 400; diffusers 160 GFLOP/s = 40%
    assert benchmark.peak_share(rows[0], "minidiff", gemm) == 0.5
    assert abs(benchmark.peak_share(rows[0], "diffusers", gemm) - 0.4) < 1e-12
    assert benchmark.peak_share(rows[1], "minidiff", gemm) is None  # no FLOPs: not a UNet row
    table = benchmark.format_table(rows, MACHINE, gemm, 4096)
    lines = table.splitlines()
    assert "Test CPU 9000" in lines[0] and "2 torch threads" in lines[0] and "diffusers 0.35.2" in lines[0]
    assert "avx512_bf16 yes" in lines[1] and "amx_bf16 no" in lines[1]
    assert "load average at the start 0.1, at the end 2.5" in lines[1]
    assert "fp32 400 GFLOP/s" in lines[2] and "bf16 800 GFLOP/s" in lines[2]
    assert lines[4] == "| figure | minidiff | diffusers | ratio |"
    assert lines[6] == ("| UNet forward 64x64 latents, 77 tokens, fp32, warm median (s) | "
                        "4.000 = 50% of GEMM peak | 5.000 = 40% of GEMM peak | 0.80 |")
    assert lines[7] == "| restore peak RSS above start (MiB) | 3000 | 4000 | 0.75 |"
    assert lines[8] == "| VAE decode 512x512, bf16, warm median (s) | 2.500 | n/a |  |"


def test_main_prints_the_table_and_writes_json(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_bench(ctx, dtype):
        seen.setdefault("dtypes", []).append(dtype)
        seen["runs"] = ctx.args.runs
        if dtype == "bf16":  # what --json held after the first dtype: that one's rows, "complete": false
            seen["partial"] = json.loads(out.read_text())
        return (fake_rows() if dtype == "fp32" else []), {"raw": 1}
    monkeypatch.setattr(benchmark, "BENCHMARKS", {"unet": fake_bench, "load": fake_bench})
    monkeypatch.setattr(benchmark, "gemm_gflops", lambda dtype, n: 400.0)
    out = tmp_path / "bench.json"
    benchmark.main(["--only", "unet", "--dtypes", "fp32,bf16", "--quick", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| UNet forward 64x64 latents, 77 tokens, fp32, warm median (s) | 4.000 = 50% of GEMM" in printed
    partial = seen.pop("partial")
    assert seen == {"dtypes": ["fp32", "bf16"], "runs": 1}  # --quick: one timed run
    assert not partial["complete"] and len(partial["rows"]) == 3 and list(partial["raw"]["unet"]) == ["fp32"]
    doc = json.loads(out.read_text())
    assert doc["gemm_gflops"] == {"fp32": 400.0, "bf16": 400.0}
    assert doc["raw"] == {"unet": {"fp32": {"raw": 1}, "bf16": {"raw": 1}}} and doc["complete"]
    assert [r["ratio"] for r in doc["rows"]] == [0.8, 0.75, None]
    assert doc["rows"][0]["minidiff_gemm_peak_share"] == 0.5 and doc["rows"][0]["flops"] == 800e9
    assert doc["machine"]["cpu"]["model"] and doc["machine"]["threads"] >= 1


@pytest.mark.parity
def test_unet_flops_equal_diffusers_count():
    """The FLOPs behind the GEMM-peak share, counted on the meta device (no memory, ~5 s with the import):
    minidiff's SD-1.5 UNet and diffusers' count the same 180.1 GFLOP at 32x32 latents, 77 tokens."""
    diffusers = pytest.importorskip("diffusers")
    from torch.utils.flop_counter import FlopCounterMode
    from minidiff.models.unet import UNetConfig
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
        with FlopCounterMode(display=False) as counter:
            ref(torch.empty(1, 4, 32, 32), torch.tensor([500]), encoder_hidden_states=torch.empty(1, 77, 768))
    flops = benchmark.unet_flops(UNetConfig(), 32, 77)
    assert flops == counter.get_total_flops() and abs(flops / 1e9 - 180.1) < 0.1


def test_a_failed_benchmark_is_reported_and_the_others_still_print(monkeypatch, capsys):
    def broken(ctx, dtype):
        raise RuntimeError("the load worker (fp32) exited with 1")
    monkeypatch.setattr(benchmark, "BENCHMARKS",
                        {"load": broken, "unet": lambda ctx, dtype: (fake_rows(), {})})
    monkeypatch.setattr(benchmark, "gemm_gflops", lambda dtype, n: 400.0)
    with pytest.raises(SystemExit, match=r"benchmark: load \(fp32\): the load worker"):
        benchmark.main(["--only", "load,unet", "--dtypes", "fp32"])
    assert "| restore peak RSS above start (MiB) | 3000 | 4000 | 0.75 |" in capsys.readouterr().out


@pytest.mark.parity
def test_oracle_restore_runs_in_bf16_through_the_input_casts(tmp_path):
    """restore in bf16: the official loop (written for fp32 inputs) on tiny bf16 networks, each input cast at
    the network's door by benchmark._cast_inputs (the SCB's residual list included), lands within a few
    levels of the fp32 run (measured: 4 of 255)."""
    pytest.importorskip("diffusers")
    import numpy as np
    from PIL import Image
    import official_oracle as oracle
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        unet, vae, _, clip = oracle.make_sd_and_clip(tmp_path / str(dtype), seed=0)  # the same weights
        torch.manual_seed(1)
        tpb, scb = oracle.RefTPB(), oracle.RefSCB()
        for m in (unet, vae, clip, tpb, scb):
            m.to(dtype)
        for m in (clip, vae.encoder, vae.post_quant_conv, unet, scb):  # as benchmark.measure_restore
            benchmark._cast_inputs(m, dtype)
        image = oracle.official_restore(unet, vae, clip, [("derain", tpb, scb)], photo, photo, steps=2)
        out[dtype] = np.asarray(image, dtype=np.int16)
    assert np.abs(out[torch.float32] - out[torch.bfloat16]).max() <= 8


def test_measure_unet_and_vae_on_tiny_networks():
    """The in-process measurements on tiny minidiff networks (minidiff alone: no max diff): the figures'
    shape, one timed run per figure, and the FLOPs counted for the network's own config."""
    from types import SimpleNamespace
    from minidiff.models.unet import TINY_UNET, UNet
    from minidiff.models.vae import TINY_VAE, AutoencoderKL
    torch.manual_seed(0)
    sd = SimpleNamespace(unet=UNet(TINY_UNET).eval(), vae=AutoencoderKL(TINY_VAE).eval())
    kw = {"unet": [(8, 5)], "vae": 32, "runs": 1, "warmup": 0, "seed": 0, "dtype": "fp32"}
    with torch.inference_mode():
        unet = benchmark.measure_unet({"minidiff": {"sd": sd}}, kw, torch.float32)
        vae = benchmark.measure_vae({"minidiff": {"sd": sd}}, kw, torch.float32)
    m = unet["8x5"]
    assert (m["size"], m["tokens"], m["max_diff"]) == (8, 5, None) and len(m["times_s"]["minidiff"]) == 1
    assert m["flops"] == benchmark.unet_flops(TINY_UNET, 8, 5) > 0
    assert set(vae) == {"encode", "decode"} and vae["decode"]["size"] == 32
