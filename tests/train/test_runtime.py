"""Process-level CPU settings: glibc keeps freed memory for reuse (fewer page faults per step)."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys

import pytest
import torch

from somoe.train.runtime import resolve_precision

# allocates, touches and frees a 64 MiB tensor 24 times; prints whether the setting was applied and
# the page faults of each round (the first rounds may grow the heap until its layout settles)
CHURN = """
import resource, sys, torch
from somoe.train.runtime import keep_freed_cpu_memory
applied = keep_freed_cpu_memory() if sys.argv[1] == "keep" else False
faults = []
for _ in range(24):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, *faults)
"""


def _churn(mode: str, env_value: str | None = None) -> tuple[bool, float]:
    """(applied, the median page faults of the last 12 rounds)"""
    env = dict(os.environ)
    env.pop("SOMOE_KEEP_FREED_MEMORY", None)
    if env_value is not None:
        env["SOMOE_KEEP_FREED_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, env=env, check=True)
    applied, *faults = out.stdout.split()
    return applied == "True", statistics.median(int(f) for f in faults[-12:])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_kept_memory_is_reused_without_page_faults():
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    applied, faults_default = _churn("default")
    assert not applied and faults_default > 0.9 * pages  # every 64 MiB tensor is a fresh mapping
    applied, faults_kept = _churn("keep")
    assert applied and faults_kept < pages / 10  # the heap's pages stay mapped and are reused
    applied, faults_opt_out = _churn("keep", env_value="0")
    assert not applied and faults_opt_out > 0.9 * pages


@pytest.mark.parametrize("native_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cpu_follows_native_bf16_support(monkeypatch, native_bf16, expected):
    # an AVX2-only CPU emulates bf16 matmuls (~30x slower than fp32): auto must not pick it there
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native_bf16)
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"  # an explicit choice is kept
