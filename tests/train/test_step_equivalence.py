"""The compiled training step computes what the eager one does, checked tensor by tensor:

- every trainable parameter's gradient by name (query net, ``log_tau``, router, experts, backbone),
  eager against the compiled step and against its CUDA-graph replay, for dense, MoE and SoME;
- SoME's keys, usage and centring buffers after one optimizer step with the rules on, eager against
  the compiled step (through the trainer).

On CUDA: bf16 autocast, inductor, CUDA graphs, at a bf16 tolerance. On the CPU the same comparisons run
in fp32 with ``aot_eager`` (dynamo's and AOTAutograd's tracing, no inductor kernels), so that CI exercises
them; the CUDA-graph replay is CUDA-only. A loss within 2% or one cosine over all gradients together
would pass with a wrong router, query net or temperature gradient; these would not.
"""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_config
from somoe.config import load_config
from somoe.models.transformer import build_model
from somoe.train.optim import build_optimizer
from somoe.train.runtime import autocast_factory
from somoe.train.step import CompiledStep
from somoe.train.trainer import Trainer

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                     reason="needs a CUDA GPU (bf16, inductor, CUDA graphs)"))
DEVICES = ["cpu", CUDA]
# bf16 keeps 8 significant bits (0.4% per rounding) and two traces of the same step round in different
# orders: each parameter's gradient within 5% of its eager norm (a wrong gradient is off by tens of %).
# fp32 with the same kernels (aot_eager): within 1e-4.
TOLERANCE = {"cuda": 5e-2, "cpu": 1e-4}
TINY = ("model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=16",
        "data.seq_len=16", "train.batch_size=4", "model.d_ffn=64", "model.dropout=0.0", "train.grad_clip=0")
KINDS = {
    "dense": ("cpu_gpt2", ()),
    "moe": ("cpu_moe", ("model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.d_ffn=16",
                        "model.moe.noisy_gating=false")),  # the noise is drawn in another order when traced
    "some": ("cpu_some", ("model.some.num_experts=8", "model.some.top_k=4", "model.some.d_ffn=16",
                          "model.some.entropy_band=[0.5,1.2]", "model.some.peer=true",
                          "model.some.decay_target=sample")),
}


class _GradientStep(CompiledStep):
    """The compiled step with AdamW replaced by copying its gradients into fixed buffers: the traced
    forward and backward (and their CUDA-graph replay) are the product's, the update is left out."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.captured = [torch.zeros_like(p) for p in self.params]

    def _adamw(self, grads, lr, ok) -> None:
        for buf, g in zip(self.captured, grads):
            buf.copy_(g)


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_parameters_gradient_matches_eager_compiled_and_graphed(device, kind):
    preset, extra = KINDS[kind]
    cfg = load_config(preset=preset, overrides=[*TINY, *extra])
    dev, precision = torch.device(device), "bf16" if device == "cuda" else "fp32"
    torch.manual_seed(0)
    model = build_model(cfg.model, dev).train()
    total = 8
    model.set_progress(total, total)  # past the top-k warm-up: eager and traced selections agree
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "some":
        assert any(n.endswith("log_tau") for n in names) and any(".query." in n for n in names)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(3, cfg.model.vocab_size, (4, 16), generator=g)
    y = torch.randint(3, cfg.model.vocab_size, (4, 16), generator=g)
    start = {n: b.clone() for n, b in model.named_buffers()}

    def restore():  # the rules move keys and usage at every call: each call starts from the same state
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(start[n])

    autocast = autocast_factory(precision, dev)
    with autocast():
        out = model(x.to(dev), y.to(dev))
    loss = out.ce_loss + (out.aux_loss if out.aux_loss is not None else 0.0)
    eager = [torch.zeros_like(p) if gr is None else gr
             for p, gr in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]
    assert sum(float(gr.abs().sum() > 0) for gr in eager) > len(eager) // 2

    torch._dynamo.reset()
    optimizer = build_optimizer(model, cfg.train, dev.type, capturable=True)
    step = _GradientStep(model, optimizer, cfg.train, dev, autocast, 1,
                         backend="inductor" if device == "cuda" else "aot_eager", cuda_graphs=device == "cuda")
    name_of = {id(p): n for n, p in model.named_parameters()}

    def captured() -> dict[str, torch.Tensor]:  # the step's parameters come in its optimizer groups' order
        return {name_of[id(p)]: b.clone() for p, b in zip(step.params, step.captured)}

    modes = {}
    for call in range(3 if device == "cuda" else 1):  # CUDA: 2 uncaptured calls, then the capture and its replay
        restore()
        model.set_progress(total, total)
        step([(x, y)], total, total, cfg.train.lr)
        if call == 0:
            modes["compiled"] = captured()
    if device == "cuda":
        modes["cuda_graph"] = captured()
    assert all(sorted(grads) == sorted(names) for grads in modes.values())
    bad = {(mode, n): round(_rel_err(grads[n], ref), 4) for mode, grads in modes.items()
           for n, ref in zip(names, eager) if _rel_err(grads[n], ref) > TOLERANCE[device]}
    assert not bad, bad


SOME_RULES = ("model.ffn=some", "model.some.num_experts=8", "model.some.top_k=4", "model.some.d_ffn=16",
              "model.some.som_warmup_steps=0", "model.some.learnable_tau=true", "model.some.entropy_band=[0.5,1.2]",
              "model.some.key_ema=0.9", "model.some.center_queries=true", "model.some.peer=true",
              "model.some.gamma=0.1", "model.some.decay_target=sample", "model.dropout=0.0")
BUFFERS = ("key_store", "key_route", "usage_ema", "query_center", "query_mean_ema", "log_tau")


@pytest.mark.parametrize("device", DEVICES)
def test_keys_usage_and_centring_after_one_step_match_eager(tmp_path, data_cache, device):
    """One optimizer step of the trainer, eager and compiled (``train.compile=step``), rules on from step 0:
    each buffer's move from its initial value agrees (5% of the eager move in bf16, 1e-4 in fp32), the same
    experts were counted dormant and one update was applied."""
    run = ("train.max_steps=2", "train.eval_every=0", *SOME_RULES)
    if device == "cuda":
        run += ("train.device=cuda", "train.precision=bf16")
    backend = "inductor" if device == "cuda" else "aot_eager"
    trainers = {}
    for mode, extra in (("eager", ()), ("compiled", ("train.compile=step", f"train.compile_backend={backend}"))):
        torch._dynamo.reset()
        trainers[mode] = Trainer(tiny_config(data_cache, *run, *extra), tmp_path / mode, progress=False,
                                 log=lambda m: None)
    layers = {mode: t.model.self_organizing_layers() for mode, t in trainers.items()}
    before = [{n: layer.get_buffer(n).clone() if n != "log_tau" else layer.log_tau.detach().clone()
               for n in BUFFERS} for layer in layers["eager"]]
    for t in trainers.values():
        t.train_step()
    for i, (a, b) in enumerate(zip(layers["eager"], layers["compiled"])):
        assert int(a.som_updates) == int(b.som_updates) == 1
        assert torch.equal(a.dormant_streak, b.dormant_streak)
        for n in BUFFERS:
            ta, tb = (getattr(layer, n).detach() for layer in (a, b))
            move = ta - before[i][n]
            assert move.abs().max() > 0, (i, n)  # the step moved it
            assert _rel_err(tb - before[i][n], move) <= TOLERANCE[device], (i, n, _rel_err(tb - before[i][n], move))
