"""Tests of minidiff/io/weights.py's reading: read_state_dict converting while it reads (as_loaded: dtype and
channels-last conv kernels), and what that costs in memory, in a fresh process.

The rename tables are tested with their families (test_loading.py, test_vae.py, test_clip_vision.py, ...).
Run: cd /work/main && python -m pytest tests/test_weights.py -q -s      (about 5 s)
"""
import json

import torch
from safetensors.torch import save_file

from helpers import python_in_subprocess
from minidiff.io.weights import as_loaded, load_strict, read_state_dict


def test_read_converts_to_the_model_form_and_load_strict_keeps_it(tmp_path):
    g = torch.Generator().manual_seed(0)
    stored = {"conv.weight": torch.randn(8, 4, 3, 3, generator=g).half(), "conv.bias": torch.randn(8).half(),
              "ids": torch.arange(5)}
    save_file(stored, str(tmp_path / "w.safetensors"))
    lazy = read_state_dict(str(tmp_path / "w.safetensors"))  # no dtype: as stored
    assert all(lazy[k].dtype == v.dtype and torch.equal(lazy[k], v) for k, v in stored.items())
    read = read_state_dict(str(tmp_path / "w.safetensors"), dtype=torch.bfloat16)
    assert read["ids"].dtype == torch.int64 and torch.equal(read["ids"], stored["ids"])
    for k in ("conv.weight", "conv.bias"):  # fp16 -> bf16 directly equals the round trip through fp32
        assert read[k].dtype == torch.bfloat16 and torch.equal(read[k], stored[k].float().bfloat16())
    assert read["conv.weight"].is_contiguous(memory_format=torch.channels_last)
    assert as_loaded(read["conv.weight"], torch.bfloat16) is read["conv.weight"]  # nothing left to do

    class Conv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 8, 3)
            self.register_buffer("ids", torch.zeros(5, dtype=torch.int64))

    with torch.device("meta"):
        model = Conv()
    model = load_strict(model, read, "conv", dtype=torch.bfloat16)
    assert model.conv.weight.data_ptr() == read["conv.weight"].data_ptr()  # assigned, not copied again


# In a fresh interpreter: read the fp16 file into bf16 with a small conversion window; report the peak RSS
# growth and whether the file is still mapped.
PEAK_SCRIPT = """
import json, torch
import minidiff.io.weights as w
def hwm():  # peak RSS of this process image in MiB (ru_maxrss would count the parent's from before exec)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
path = {path!r}
w.CAST_WINDOW_BYTES = 8 * 2**20
base = hwm()
sd = w.read_state_dict(path, dtype=torch.bfloat16)
peak = hwm()
mapped = any(path in line for line in open("/proc/self/maps"))
print(json.dumps({{"growth_mib": peak - base, "mapped": mapped, "n": len(sd)}}))
"""


def test_fp16_file_into_bf16_holds_one_copy(tmp_path):
    """Reading a 256 MiB fp16 file into bf16: the process grows by the 256 MiB of bf16 weights plus about one
    8 MiB window (measured: 268 MiB), not by the file as well (516 MiB measured when the whole mapping is
    read, then converted), and no view keeps the file mapped. Bound: 256 + 8 + 40 MiB of allocator slack."""
    mib, path = 256, str(tmp_path / "big.safetensors")
    g = torch.Generator().manual_seed(0)
    save_file({f"t{i}": torch.randn(1024, 512, 2, 2, generator=g).half() for i in range(mib // 4)}, path)
    proc = python_in_subprocess(PEAK_SCRIPT.format(path=path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"[fp16 -> bf16 read] peak RSS growth {out['growth_mib']:.0f} MiB for {mib} MiB of weights")
    assert out["n"] == mib // 4 and not out["mapped"]
    assert out["growth_mib"] <= mib + 8 + 40
