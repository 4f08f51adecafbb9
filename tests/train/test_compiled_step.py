"""train.compile=step: the whole training step (forward, backward, clipping, key rules, tallies, AdamW) as
one graph. The same losses as the eager trainer, one compile and no graph break for every FFN on both
backbones, exact resume, and one-line errors for settings it does not take."""

from __future__ import annotations

import json

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from helpers import tiny_config
from somoe.config import ConfigError
from somoe.train.checkpoint import list_checkpoints
from somoe.train.step import staged_for
from somoe.train.trainer import Trainer

QUIET = dict(progress=False, log=lambda m: None)
SOME = ("model.ffn=some", "model.some.num_experts=8", "model.some.top_k=4", "model.some.d_ffn=16",
        "model.some.topk_warmup=0.25", "model.some.topk_ramp=0.25", "model.some.som_warmup_steps=3",
        "model.some.learnable_tau=true", "model.some.entropy_band=[1.0,1.2]", "model.some.key_ema=0.9",
        "model.some.decay_target=sample", "model.some.center_queries=true", "model.some.peer=true")
MOE = ("model.ffn=moe", "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.d_ffn=16",
       "model.moe.noisy_gating=true", "model.moe.noise_start_step=2")
SMOLLM = ("model.backbone=smollm", "model.positions=rope", "model.activation=swiglu")
KINDS = {"dense": (), "moe": MOE, "some": SOME, "some-lora": SOME + ("model.some.lora_rank=2",),
         "dense-smollm": SMOLLM, "moe-smollm": MOE + SMOLLM, "some-smollm": SOME + SMOLLM}


def train_losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


@pytest.mark.parametrize("kind", ["dense", "moe", "some"])
def test_compiled_step_gives_the_eager_losses(tmp_path, data_cache, kind):
    """fp32 on CPU, 8 steps with two micro-batches, an eval in the middle (the train/eval switch), the top-k
    ramp, the rules' warm-up and the MoE noise start: every logged loss within 1e-5 (relative) of eager's,
    and the final keys as well."""
    # the MoE noise is drawn in another order inside the compiled graph: the comparison turns it off
    base = ("train.max_steps=8", "train.grad_accum=2", "model.dropout=0.0", *KINDS[kind], "model.moe.noisy_gating=false")
    eager = Trainer(tiny_config(data_cache, *base), tmp_path / "eager", **QUIET)
    eager.fit()
    torch._dynamo.reset()
    backend = "aot_eager" if kind == "some" else "eager"  # aot_eager: functionalized buffer updates (slower)
    compiled = Trainer(tiny_config(data_cache, *base, "train.compile=step", f"train.compile_backend={backend}"),
                       tmp_path / "compiled", **QUIET)
    compiled.fit()
    a, b = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(abs(a[s] - b[s]) <= 1e-5 * abs(a[s]) for s in a), (a, b)
    assert a[8] < a[1]  # it trains
    for la, lb in zip(eager.model.self_organizing_layers(), compiled.model.self_organizing_layers()):
        assert int(la.som_updates) == int(lb.som_updates) == 8
        assert torch.allclose(la.key_store, lb.key_store, atol=1e-5), (la.key_store - lb.key_store).abs().max()
        assert torch.allclose(la.log_tau, lb.log_tau, atol=1e-6)


def _frames_and_breaks(tmp_path, data_cache, overrides) -> tuple[int, int, Trainer]:
    torch._dynamo.reset()
    counters.clear()
    frames = CompileCounterWithBackend("eager")
    trainer = Trainer(tiny_config(data_cache, "train.compile=step", *overrides), tmp_path, **QUIET)
    trainer.compiled_step._fn = torch.compile(trainer.compiled_step._step, fullgraph=True, backend=frames)
    trainer.fit()
    return frames.frame_count, sum(counters["graph_break"].values()), trainer


@pytest.mark.parametrize("kind", ["some-lora", "moe-smollm"])
def test_compiled_step_is_one_graph_for_the_whole_run(tmp_path, data_cache, kind):
    """The trainer's 8 steps through the top-k ramp (k 1 -> 4), the rules' warm-up, the noise start, two
    evals and the train/eval switches: one compiled frame, no graph break, no recompile (every FFN on both
    backbones: tests/models/test_compile_fullgraph.py, through ``somoe bench compile``)."""
    n, breaks, trainer = _frames_and_breaks(tmp_path, data_cache, ("train.max_steps=8", *KINDS[kind]))
    assert trainer.step == 8
    assert breaks == 0 and n == 1, (n, breaks)


def test_compiled_step_resumes_exactly(tmp_path, data_cache):
    """A compiled SoME run stopped after its step-4 checkpoint and resumed (in a new compile) logs the
    uninterrupted run's losses bit for bit and ends with the same weights and keys."""
    over = ("train.max_steps=8", "train.ckpt_every=4", "train.eval_every=0", "model.dropout=0.1",
            "train.compile=step", "train.compile_backend=eager", *SOME)
    Trainer(tiny_config(data_cache, *over), tmp_path / "full", **QUIET).fit()
    first = Trainer(tiny_config(data_cache, *over), tmp_path / "part", **QUIET)
    for _ in range(4):
        metrics = first.train_step()
        for cb in first.callbacks:
            cb.on_step_end(first, metrics)
    torch._dynamo.reset()
    resumed = Trainer(tiny_config(data_cache, *over), tmp_path / "part", resume="auto", **QUIET)
    assert resumed.step == 4
    resumed.fit()
    a, b = train_losses(tmp_path / "full"), train_losses(tmp_path / "part")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(a[s] == b[s] for s in a), (a, b)
    from safetensors.torch import load_file

    sa, sb = (load_file(str(list_checkpoints(tmp_path / r)[-1] / "model.safetensors")) for r in ("full", "part"))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class _Watched(torch.Tensor):
    """A step output that records the trainer's step whenever its value is read on the host."""

    reads: list[int] = []
    trainer = None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy"):
            cls.reads.append(cls.trainer.step)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_compiled_run_reads_the_steps_values_only_at_log_steps(tmp_path, data_cache):
    """8 compiled steps at train.log_every=4: the loss, gradient norm and aux loss the step returns are read
    on the host once at step 4 and once at step 8, never in between (before: three reads every step), and
    those records equal a log_every=1 run's at the same steps."""
    over = ("train.max_steps=8", "train.eval_every=0", "train.compile=step", "train.compile_backend=eager", *SOME)
    Trainer(tiny_config(data_cache, *over), tmp_path / "every", **QUIET).fit()
    torch._dynamo.reset()
    trainer = Trainer(tiny_config(data_cache, *over, "train.log_every=4"), tmp_path / "four", **QUIET)
    real = trainer.compiled_step
    _Watched.reads, _Watched.trainer = [], trainer
    trainer.compiled_step = lambda *a: {k: v if k == "ok" else v.as_subclass(_Watched) for k, v in real(*a).items()}
    trainer.fit()
    assert _Watched.reads == [4, 8]
    rows = {m: {r["step"]: r for r in map(json.loads, (tmp_path / m / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train"} for m in ("every", "four")}
    assert sorted(rows["four"]) == [4, 8] and sorted(rows["every"]) == list(range(1, 9))
    for step in (4, 8):
        a, b = rows["every"][step], rows["four"][step]
        assert isinstance(b["loss"], float) and (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"])
        assert b["tok_per_s"] > 0 and b["elapsed"] > 0


def test_a_nonfinite_step_changes_nothing(tmp_path, data_cache):
    """A step whose loss is inf (lr huge is not enough: the embedding is poisoned) leaves parameters, AdamW
    state and keys as they were, and counts as a bad step."""
    trainer = Trainer(tiny_config(data_cache, "train.max_steps=4", "train.compile=step",
                                  "train.compile_backend=eager", *SOME), tmp_path, **QUIET)
    trainer.train_step()
    with torch.no_grad():
        trainer.model.tok_emb.weight[:, 0] = float("inf")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in trainer.optimizer.state.values()]
    trainer.train_step()
    assert int(trainer._bad_steps) == 1
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.endswith("som_updates")), \
        [k for k in before if not torch.equal(before[k], after[k])]
    assert all(torch.equal(m, s["exp_avg"]) for m, s in zip(moments, trainer.optimizer.state.values()))
    assert all(float(s["step"]) == 1.0 for s in trainer.optimizer.state.values())


def test_a_cuda_step_pins_host_tensors_only(monkeypatch):
    """Before its non-blocking copies a CUDA step pins its host tensors; a batch already on the device
    (``somoe bench compile`` builds its batches there) goes as it is, since torch refuses to pin device
    memory. A meta tensor stands in for the CUDA one; pinning is recorded, and refused off the host as
    torch refuses it."""
    pinned = []

    def pin(t):
        if t.device.type != "cpu":
            raise RuntimeError("cannot pin a tensor that is not in host memory")
        pinned.append(t)
        return t

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    cuda, host, on_device = torch.device("cuda"), torch.ones(3), torch.ones(3, device="meta")
    assert staged_for(host, cuda) is host and pinned == [host]
    assert staged_for(on_device, cuda) is on_device and len(pinned) == 1
    assert staged_for(host, torch.device("cpu")) is host and len(pinned) == 1  # a CPU step copies nothing


def test_the_compiled_step_stages_its_inputs_through_staged_for(tmp_path, data_cache, monkeypatch):
    """The step's four host inputs (scalars, ids, targets, counts) go through ``staged_for`` on their way."""
    import somoe.train.step as step_module

    seen = []
    monkeypatch.setattr(step_module, "staged_for", lambda t, device: seen.append((t.device.type, device.type)) or t)
    trainer = Trainer(tiny_config(data_cache, "train.max_steps=1", "train.compile=step", "train.compile_backend=eager"),
                      tmp_path, **QUIET)
    trainer.train_step()
    assert seen == [("cpu", "cpu")] * 4


@pytest.mark.parametrize("capability", [(8, 0), (9, 0)], ids=["A100", "H100"])
def test_cuda_graphs_with_routed_experts_need_a_sync_free_grouped_matmul(monkeypatch, capability):
    """On a GPU whose grouped matmul reads its offsets on the host (an A100) a routed model's step cannot be
    captured: a one-line error before any compile; dense models and SM 9.x pass."""
    from somoe.config import load_config
    from somoe.train.step import check_compiled_step

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda")
    for preset in ("cpu_some", "cpu_moe", "cpu_gpt2"):
        cfg = load_config(preset=preset, overrides=["train.cuda_graphs=true"])
        if preset == "cpu_gpt2" or capability == (9, 0):
            check_compiled_step(cfg.train, cfg.model, cuda, 1, "bf16")
            continue
        with pytest.raises(ConfigError, match="compute capability 9.x or 10.x; this one is 8.0") as err:
            check_compiled_step(cfg.train, cfg.model, cuda, 1, "bf16")
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("over, message", [
    (("train.cuda_graphs=true",), "train.cuda_graphs=true needs a CUDA device"),
    (("train.compile=step", "train.activation_checkpointing=true"), "does not combine"),
    (("train.compile=step", "model.ffn=some", "model.some.update_token_fraction=0.5"), "update_token_fraction=1"),
])
def test_settings_the_compiled_step_refuses_are_one_line_errors(tmp_path, data_cache, over, message):
    if "cuda_graphs" in over[0] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=message) as err:
        Trainer(tiny_config(data_cache, *over), tmp_path, **QUIET)
    assert "\n" not in str(err.value)
