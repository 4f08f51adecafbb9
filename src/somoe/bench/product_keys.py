"""``somoe bench layer|train --router product``: product-key SoME at large expert counts.

Each row runs in a fresh child process (``python -m somoe.bench.product_keys ROW``), so that its peak
resident memory (``ru_maxrss``) is its own; rows run in interleaved rounds (A B C, A B C) and keep the
lower median, so that every row sees the same background load.

* ``layer`` rows: one SoME layer of ``cpu_some_pk``'s shape (its experts, d_model 128, 16x64 tokens),
  forward+backward plus the key rules, at each expert count, beside ``cpu_some``'s exhaustive layer.
  The forward's phases are timed on their own: scoring and top-k (sub-keys, or all keys), weight
  generation (the hashed table gathers of procedural experts), the experts' compute, and the rules;
  each is reported as a share of the whole (forward + backward + rules).
* ``train`` rows: whole training steps (forward, backward, clipping, rules, AdamW) of ``cpu_some_pk`` at
  each expert count, beside ``cpu_some``: milliseconds, the ratio to ``cpu_some`` and peak memory.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

import torch

LAYER_SIZES = (65_536, 1_048_576)
LAYER_COLUMNS = ["impl", "router", "num_experts", "dtype", "ms", "ratio_ms", "share_scoring_topk",
                 "share_weight_generation", "share_expert_compute", "share_rules", "peak_rss_mb"]
TRAIN_COLUMNS = ["impl", "router", "num_experts", "dtype", "ms", "ratio_ms", "peak_rss_mb", "rss_vs_smallest"]
TRAIN_SIZES = (1_024, 16_384, 65_536, 262_144, 1_048_576)  # the expert-count sweep's
REFERENCE = "cpu_some"


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _config(preset: str, experts: int | None, dtype: str):
    from ..config import load_config

    overrides = [f"train.precision={dtype}"]
    if experts:
        overrides.append(f"model.some.num_experts={experts}")
    return load_config(preset=preset, overrides=overrides)


def layer_row(preset: str, experts: int | None, dtype: str, reps: int) -> dict:
    """One layer's forward+backward+rules and its forward phases (run inside the child process)."""
    from ..models.ffn.some import SoMELayer
    from ..train.runtime import autocast_factory

    cfg = _config(preset, experts, dtype)
    layer = SoMELayer(cfg.model, 0).train()
    c, T = cfg.model.some, cfg.train.batch_size * cfg.data.seq_len
    x = torch.randn(1, T, cfg.model.d_model, generator=torch.Generator().manual_seed(0), requires_grad=True)
    amp = autocast_factory(dtype, torch.device("cpu"))

    def step():
        x.grad = None
        with amp():
            y, _ = layer(x)
        y.float().sum().backward()
        layer.self_organize(1, 100)

    def route():
        with torch.no_grad(), amp():
            if layer.product:
                return layer._route_product(x[0], None)
            scores, _, _ = layer._scores(x[0])
            return layer._select(scores)

    def experts_forward():
        with torch.no_grad(), amp():
            layer._run_experts(x[0], ids, gates)

    def generation():
        rows = layer.procedural.table_rows(ids)
        tables = layer.procedural._tables(torch.bfloat16 if dtype == "bf16" else torch.float32)
        for name, r in rows.items():
            tables[name].index_select(0, r.reshape(-1))

    def forward():
        with torch.no_grad(), amp():
            layer(x)

    def forward_and_rules():
        forward()
        layer.self_organize(1, 100)

    out = route()
    if layer.product:
        ids = (out[2] * c.subkeys_per_codebook + out[3]).view(T, -1)
        gates = torch.softmax(out[4].float(), -1).view(T, -1)
    else:
        ids, gates = out
    total = _median_ms(step, reps)
    phases = {"scoring_topk": _median_ms(route, reps), "expert_compute": _median_ms(experts_forward, reps),
              "rules": _median_ms(forward_and_rules, reps) - _median_ms(forward, reps)}
    phases["weight_generation"] = _median_ms(generation, reps) if layer.procedural is not None else 0.0
    phases["expert_compute"] -= phases["weight_generation"]
    return {"ms": total, **{f"share_{k}": max(v, 0.0) / total for k, v in phases.items()}}


def train_row(preset: str, experts: int | None, dtype: str, reps: int) -> dict:
    """Whole training steps of a preset (run inside the child process)."""
    from ..models.transformer import build_model
    from ..train.optim import build_optimizer
    from ..train.runtime import autocast_factory

    cfg = _config(preset, experts, dtype)
    model = build_model(cfg.model).train()
    optimizer = build_optimizer(model, cfg.train, "cpu")
    B, S, V = cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size
    x = torch.randint(3, V, (B, S), generator=torch.Generator().manual_seed(0))
    amp = autocast_factory(dtype, torch.device("cpu"))
    layers = model.self_organizing_layers()

    def step():
        with amp():
            loss = model(x, x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for layer in layers:
            layer.self_organize(1, 100)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"ms": _median_ms(step, reps)}


def _child(kind: str, preset: str, experts: int | None, dtype: str, reps: int, threads: int) -> dict:
    code = (f"import json, resource, torch; torch.set_num_threads({threads or torch.get_num_threads()}); "
            f"from somoe.bench.product_keys import {kind}_row; "
            f"row = {kind}_row({preset!r}, {experts!r}, {dtype!r}, {reps}); "
            f"row['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; print(json.dumps(row))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"bench row {preset} N={experts} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_product(kind: str, sizes: tuple[int, ...], dtype: str = "bf16", reps: int = 5, rounds: int = 2,
                  threads: int = 0) -> list[dict]:
    """Rows of ``kind`` (``layer`` or ``train``): the reference ``cpu_some`` and ``cpu_some_pk`` at ``sizes``."""
    specs = [(REFERENCE, None)] + [("cpu_some_pk", n) for n in sizes]
    runs: dict[tuple, list[dict]] = {spec: [] for spec in specs}
    for _ in range(rounds):
        for spec in specs:
            runs[spec].append(_child(kind, *spec, dtype, reps, threads))
    rows = []
    for (preset, experts), results in runs.items():
        best = min(results, key=lambda r: r["ms"])
        cfg = _config(preset, experts, dtype).model.some
        rows.append({"impl": preset, "router": cfg.router, "num_experts": cfg.num_experts, "dtype": dtype,
                     **best, "peak_rss_mb": max(r["peak_rss_mb"] for r in results)})
    ref = rows[0]
    for row in rows:
        row["ratio_ms"] = row["ms"] / ref["ms"]
    smallest = next((r for r in rows if r["router"] == "product"), None)
    for row in rows:
        if smallest is not None and row["router"] == "product":
            row["rss_vs_smallest"] = row["peak_rss_mb"] / smallest["peak_rss_mb"]
    return rows
