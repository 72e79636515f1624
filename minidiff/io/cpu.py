"""Does this CPU compute bfloat16 natively? (The answer picks `--dtype auto` on the CPU.)

bf16 on the CPU is only fast where the CPU has bf16 instructions: AVX-512 BF16 (VDPBF16PS: a bf16 dot product
accumulating in fp32; AMD Zen 4+, Intel Cooper Lake / Sapphire Rapids+) or AMX-BF16 (Intel Sapphire Rapids+
tile matrix units). oneDNN, which runs PyTorch's CPU convolutions and matmuls, uses them for bf16 weights.
Without them bf16 is emulated by widening to fp32 around every operation, which is slower than fp32 itself.
Measured on a 2-core AMD EPYC with AVX-512 BF16: a full-size SD-1.5 UNet forward ran faster in bf16 than in
fp32 (figures in tests/test_bf16.py's docstring).

Detection: torch.cpu.get_capabilities() (the cpuinfo library inside PyTorch, every OS) where this torch has
it (2.13 does, older ones may not), else the `flags` line of /proc/cpuinfo (Linux; the kernel's names are the
same). Only x86 is answered yes: bf16 on ARM CPUs (Graviton, Apple M) is not measured here, so it keeps fp32.
"""
import torch

# x86 features that make oneDNN's bf16 kernels native (cpuinfo names; /proc/cpuinfo spells them the same)
NATIVE_BF16_FEATURES = ("avx512_bf16", "amx_bf16")


def cpu_features():
    """Names of the CPU features that are present (a set of strings, lower case)."""
    if hasattr(torch.cpu, "get_capabilities"):
        return {name for name, present in torch.cpu.get_capabilities().items() if present is True}
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:  # not Linux: no way to tell without torch's cpuinfo, so no
        return set()


def native_bf16():
    """True when the CPU has AVX-512 BF16 or AMX-BF16, i.e. bf16 convolutions and matmuls beat fp32."""
    return any(name in cpu_features() for name in NATIVE_BF16_FEATURES)
