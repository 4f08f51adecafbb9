"""What ``scripts/gpu_check.sh`` needs, checked before it spends time: one line per missing piece (on
stderr, for the log), then one JSON line (``{"step": "preflight", ...}``, on stdout) for the run's rows.
Exit status 1 when something required is missing, else 0; the script goes on either way, since each
later step fails alone.

    python3 scripts/gpu_preflight.py [--cpu]     # --cpu: the DRY=1 rehearsal (no CUDA, triton optional)
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import shutil
import sys

missing: list[str] = []  # required
notes: list[str] = []  # optional pieces, and facts about this machine


def say(line: str) -> None:
    print(f"preflight: {line}", file=sys.stderr, flush=True)


def need(ok: bool, what: str, required: bool = True) -> bool:
    if not ok:
        (missing if required else notes).append(what)
        say(f"missing {what}" if required else f"note: {what}")
    return ok


def module(name: str, why: str, required: bool = True):
    try:
        return importlib.import_module(name)
    except Exception as err:  # an import can fail with anything, not only ImportError
        need(False, f"python package {name} ({why}): {type(err).__name__}: {err}", required)
        return None


def check_torch(cpu: bool) -> None:
    torch = module("torch", "everything")
    if torch is None:
        return
    say(f"python {sys.version.split()[0]}, torch {torch.__version__}")
    F = importlib.import_module("torch.nn.functional")
    if not cpu and need(torch.cuda.is_available(), "a CUDA device visible to torch (torch.cuda.is_available())"):
        major, minor = torch.cuda.get_device_capability()
        say(f"{torch.cuda.get_device_name()} (compute capability {major}.{minor}), CUDA {torch.version.cuda}")
        need(major in (9, 10), f"a sync-free grouped matmul (SM 9.x/10.x; this GPU is {major}.{minor}): routed "
                               f"experts run the per-expert loop and their CUDA-graph rows are skipped", False)
    need(hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm"),
         "torch.nn.functional.grouped_mm / torch._grouped_mm (the grouped expert matmul)")
    library = getattr(torch, "library", None)
    need(hasattr(library, "custom_op") and hasattr(library, "register_fake"),
         "torch.library.custom_op and register_fake (somoe::grouped_mm's fake-tensor rule)")
    try:
        from torch.optim.adamw import adamw

        need("capturable" in inspect.signature(adamw).parameters, "torch.optim.adamw.adamw(capturable=...)")
    except ImportError as err:
        need(False, f"torch.optim.adamw.adamw (the compiled step's AdamW): {err}")
    need(hasattr(torch.nn.utils, "get_total_norm"), "torch.nn.utils.get_total_norm (the compiled step's clipping)")
    config = torch._dynamo.config
    need(hasattr(config, "trace_autograd_ops"),
         "torch._dynamo.config.trace_autograd_ops (torch >= 2.11: tracing autograd.grad in the compiled step)")
    need(hasattr(config, "recompile_limit"), "torch._dynamo.config.recompile_limit")
    need(hasattr(torch.compiler, "is_compiling"), "torch.compiler.is_compiling")
    need(hasattr(torch, "get_autocast_dtype"), "torch.get_autocast_dtype (torch >= 2.4)", False)


def check_build_tools(cpu: bool) -> None:
    triton = module("triton", "inductor's GPU kernels", required=not cpu)
    if triton is not None:
        say(f"triton {triton.__version__}")
    compilers = [c for c in (os.environ.get("CC", ""), "cc", "gcc", "clang") if c and shutil.which(c)]
    need(bool(compilers), "a C compiler (cc, gcc or clang; inductor builds its CPU and launcher code with it)")


def check_somoe() -> None:
    for name, why in (("tokenizers", "BPE tokenizer"), ("safetensors", "checkpoints, expert cache"),
                      ("numpy", "token caches"), ("yaml", "configs (pyyaml)"), ("tqdm", "progress"),
                      ("pytest", "the CUDA tests")):
        module(name, why)
    module("matplotlib", "plots of summaries (not used by this script)", required=False)
    module("transformers", "the transformers reference rows", required=False)
    module("somoe", "this checkout on PYTHONPATH (PYTHONPATH=src)")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", action="store_true", help="the DRY=1 rehearsal: no CUDA needed")
    args = parser.parse_args()
    check_torch(args.cpu)
    check_build_tools(args.cpu)
    check_somoe()
    say(f"{len(missing)} missing, {len(notes)} notes")
    print(json.dumps({"step": "preflight", "missing": missing, "notes": notes}), flush=True)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
