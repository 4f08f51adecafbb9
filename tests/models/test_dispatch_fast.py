"""The fast dispatch paths against a naive per-token loop: gates folded per expert, trainable
weights (MoE), SwiGLU, grouped-matmul (device counts) path, degenerate routing, no host sync."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from somoe.models.dispatch import Groups, LoRA, _ActivationOnAten, dispatch, grouped_mlp, grouped_swiglu

T, D, E, K, FF = 29, 8, 5, 2, 12


def weights(seed=0, dtype=torch.float32, trainable=False, ff=FF):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(E, D, ff, generator=g) / D ** 0.5, torch.randn(E, ff, generator=g) * 0.1,
          torch.randn(E, ff, D, generator=g) / ff ** 0.5, torch.randn(E, D, generator=g) * 0.1]
    return [w.to(dtype).requires_grad_(trainable) for w in ws]


def routing(seed=1, pick=None):
    g = torch.Generator().manual_seed(seed)
    idx_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    if pick is not None:  # every token's first slot goes to one expert
        idx_TK[:, 0] = pick
        idx_TK[:, 1] = torch.where(idx_TK[:, 1] == pick, (pick + 1) % E, idx_TK[:, 1])
    gates_TK = torch.softmax(torch.randn(T, K, generator=g), -1).requires_grad_(True)
    return idx_TK, gates_TK


def naive_mlp(x_TD, idx_TK, gates_TK, w1, b1, w2, b2, act=F.gelu):
    out = []
    for t in range(x_TD.shape[0]):
        y = x_TD.new_zeros(D)
        for j in range(idx_TK.shape[1]):
            e = int(idx_TK[t, j])
            h = act(x_TD[t] @ w1[e].float() + b1[e].float())
            y = y + gates_TK[t, j] * (h @ w2[e].float() + b2[e].float())
        out.append(y)
    return torch.stack(out)


def grads(y, inputs, probe):
    return torch.autograd.grad((y * probe).sum(), inputs)


@pytest.mark.parametrize("grouped", [False, True])
def test_trainable_expert_gradients_match_naive(grouped):
    """MoE experts are parameters: dW1, db1, dW2, db2, dx and the gates' gradient all match."""
    ws = weights(trainable=True)
    idx_TK, gates_TK = routing()
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(2), requires_grad=True)
    probe = torch.randn(T, D, generator=torch.Generator().manual_seed(3))
    y = dispatch(x, idx_TK, gates_TK, lambda s, c: grouped_mlp(s, c, *ws), E, grouped=grouped)
    ref = naive_mlp(x, idx_TK, gates_TK, *ws)
    assert torch.allclose(y, ref, atol=1e-5)
    for got, want in zip(grads(y, [x, gates_TK, *ws], probe), grads(ref, [x, gates_TK, *ws], probe)):
        assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("pick", [0, 3])
def test_one_expert_takes_every_token_and_others_stay_empty(pick):
    """All tokens' first slot on one expert; with K=2 at most E-1 others share the rest."""
    ws = weights(seed=4)
    idx_TK, gates_TK = routing(seed=5, pick=pick)
    idx_TK[:, 1] = (pick + 1) % E  # two experts used, three empty
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(6), requires_grad=True)
    probe = torch.randn(T, D)
    y = dispatch(x, idx_TK, gates_TK, lambda s, c: grouped_mlp(s, c, *ws), E)
    ref = naive_mlp(x, idx_TK, gates_TK, *ws)
    assert torch.allclose(y, ref, atol=1e-5)
    for got, want in zip(grads(y, [x, gates_TK], probe), grads(ref, [x, gates_TK], probe)):
        assert torch.allclose(got, want, atol=1e-5)


def test_relu_and_a_custom_activation_use_the_right_derivative():
    ws = weights(seed=7)
    idx_TK, gates_TK = routing(seed=8)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(9), requires_grad=True)
    probe = torch.randn(T, D)
    for act in (F.relu, torch.tanh):
        y = dispatch(x, idx_TK, gates_TK, lambda s, c: grouped_mlp(s, c, *ws, activation=act), E)
        ref = naive_mlp(x, idx_TK, gates_TK, *ws, act=act)
        assert torch.allclose(y, ref, atol=1e-5)
        assert torch.allclose(grads(y, [x], probe)[0], grads(ref, [x], probe)[0], atol=1e-5)


@pytest.mark.parametrize("grouped", [False, True])
def test_swiglu_matches_naive_with_weight_gradients(grouped):
    g = torch.Generator().manual_seed(10)
    wg, w1 = (torch.randn(E, D, FF, generator=g) / D ** 0.5 for _ in range(2))
    w2 = torch.randn(E, FF, D, generator=g) / FF ** 0.5
    ws = [w.requires_grad_(True) for w in (wg, w1, w2)]
    idx_TK, gates_TK = routing(seed=11)
    x = torch.randn(T, D, generator=g, requires_grad=True)
    probe = torch.randn(T, D, generator=g)
    y = dispatch(x, idx_TK, gates_TK, lambda s, c: grouped_swiglu(s, c, *ws), E, grouped=grouped)
    rows = []
    for t in range(T):
        rows.append(sum(gates_TK[t, j] * ((F.silu(x[t] @ wg[e]) * (x[t] @ w1[e])) @ w2[e])
                        for j, e in enumerate(idx_TK[t].tolist())))
    ref = torch.stack(rows)
    assert torch.allclose(y, ref, atol=1e-5)
    for got, want in zip(grads(y, [x, gates_TK, *ws], probe), grads(ref, [x, gates_TK, *ws], probe)):
        assert torch.allclose(got, want, atol=1e-5)


def test_bf16_frozen_experts_gradients_within_bf16_tolerance():
    ws = weights(seed=12, dtype=torch.bfloat16)
    idx_TK, gates_TK = routing(seed=13)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(14), requires_grad=True)
    probe = torch.randn(T, D)
    y = dispatch(x, idx_TK, gates_TK, lambda s, c: grouped_mlp(s, c, *ws), E, torch.bfloat16)
    ref = naive_mlp(x, idx_TK, gates_TK, *ws)
    assert y.dtype == torch.float32
    assert (y - ref).abs().max() < 0.03 * ref.abs().max()
    for got, want in zip(grads(y, [x, gates_TK], probe), grads(ref, [x, gates_TK], probe)):
        assert (got - want).abs().max() < 0.03 * want.abs().max()


def test_frozen_backward_runs_only_input_gradient_matmuls():
    """Frozen experts: per non-empty expert 2 forward + 2 backward matmuls, nothing for weights."""
    ws = weights(seed=15)
    idx_TK, gates_TK = routing(seed=16)
    x = torch.randn(T, D, requires_grad=True)
    used = int(torch.bincount(idx_TK.flatten(), minlength=E).gt(0).sum())
    with torch.profiler.profile() as prof:
        dispatch(x, idx_TK, gates_TK, lambda s, c: grouped_mlp(s, c, *ws), E).sum().backward()
    calls = {ev.key: ev.count for ev in prof.key_averages()}
    assert calls.get("aten::mm", 0) + calls.get("aten::addmm", 0) == 4 * used
    assert all(w.grad is None for w in ws)


def test_groups_carry_gates_and_are_applied_once():
    """An expert_fn that does not fold gates still gets them applied by dispatch, exactly once."""
    ws = weights(seed=17)
    idx_TK, gates_TK = routing(seed=18)
    x = torch.randn(T, D)
    seen = []

    def plain(x_SD, counts):
        seen.append(isinstance(counts, Groups) and list(counts) == torch.bincount(idx_TK.flatten(), minlength=E).tolist())
        outs = [F.gelu(xs @ ws[0][e] + ws[1][e]) @ ws[2][e] + ws[3][e] for e, xs in enumerate(x_SD.split(counts))]
        return torch.cat(outs)

    y = dispatch(x, idx_TK, gates_TK, plain, E)
    assert seen == [True]
    assert torch.allclose(y, naive_mlp(x, idx_TK, gates_TK, *ws), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_dispatch_has_no_host_sync_and_captures_in_a_graph():
    dev = torch.device("cuda")
    ws = [w.to(dev) for w in weights(seed=19, dtype=torch.bfloat16, ff=16)]  # CUDA's kernel: 16-byte rows
    idx_TK, gates_TK = (t.detach().to(dev) for t in routing(seed=20))
    x = torch.randn(T, D, device=dev)
    ref = dispatch(x, idx_TK, gates_TK, lambda s, c: grouped_mlp(s, c, *ws), E, torch.bfloat16)
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the hot path raises
    try:
        dispatch(x, idx_TK, gates_TK, lambda s, c: grouped_mlp(s, c, *ws), E, torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        out = dispatch(x, idx_TK, gates_TK, lambda s, c: grouped_mlp(s, c, *ws), E, torch.bfloat16)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.allclose(out, ref, atol=1e-2)
    # d_ffn 12 (24-byte rows): the grouped kernel refuses it, the per-expert loop takes over
    ws12 = [w.to(dev) for w in weights(seed=19, dtype=torch.bfloat16)]
    y = dispatch(x, idx_TK, gates_TK, lambda s, c: grouped_mlp(s, c, *ws12), E, torch.bfloat16)
    ref12 = naive_mlp(x.cpu(), idx_TK.cpu(), gates_TK.cpu(), *(w.cpu() for w in ws12))
    assert (y.cpu() - ref12).abs().max() < 0.03 * ref12.abs().max()


@pytest.mark.parametrize("padded", [False, True])
def test_autocast_saves_no_cast_copy_of_fp32_frozen_experts(padded, monkeypatch):
    """Under bf16 autocast, fp32-stored frozen experts are cast on the fly, never saved cast for backward
    (per expert in the loop; whole in the padded-bmm path, which bf16 takes when routing is balanced)."""
    import somoe.models.dispatch as dispatch_module

    monkeypatch.setattr(dispatch_module, "PADDED_MAX_WASTE", 10.0 if padded else 0.0)
    ws = weights(seed=21)
    idx_TK, gates_TK = routing(seed=22)
    x = torch.randn(T, D, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        from somoe.models.dispatch import compute_dtype
        y = dispatch(x, idx_TK, gates_TK, lambda s, c: grouped_mlp(s, c, *ws), E, compute_dtype(x, ws[0].dtype))
    y.sum().backward()
    assert (torch.float32, (E, D, FF)) in saved  # the stored buffers themselves (no copy)
    # bf16 saved: pre-activations (bucketed rows x FF; padded: the busiest expert's bucketed rows for
    # each of the E experts, all in one group), ungated outputs (S x D), gates (S)
    S = T * K
    counts = torch.bincount(idx_TK.flatten(), minlength=E).tolist()
    bucket = dispatch_module.ROW_BUCKET  # the loop's pre-activations keep their bucketed rows
    assert min(counts) > 0 and E <= dispatch_module.PADDED_GROUP
    rows = E * -(-max(counts) // bucket) * bucket if padded else sum(-(-c // bucket) * bucket for c in counts)
    pre = rows * FF
    assert sum(math.prod(shape) for dt, shape in saved if dt == torch.bfloat16) == pre + S * D + S
    assert x.grad is not None and x.grad.dtype == torch.float32


def test_autocast_trainable_fp32_experts_get_fp32_gradients():
    ws = weights(seed=23, trainable=True)
    idx_TK, gates_TK = routing(seed=24)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(25))
    probe = torch.randn(T, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dispatch(x, idx_TK, gates_TK, lambda s, c: grouped_mlp(s, c, *ws), E, torch.bfloat16)
    got = grads(y, ws, probe)
    want = grads(naive_mlp(x, idx_TK, gates_TK, *ws), ws, probe)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and (g - w).abs().max() < 0.03 * w.abs().max()


def _swiglu_weights(seed: int):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(E, D, FF, generator=g) / D ** 0.5, torch.randn(E, D, FF, generator=g) / D ** 0.5,
          torch.randn(E, FF, D, generator=g) / FF ** 0.5]
    return [w.requires_grad_(True) for w in ws]


class _MatmulRows(TorchDispatchMode):
    """Records the row count of every bf16 matmul: M of ``a @ b``, and the reduced dimension of a
    weight gradient ``a.t() @ d`` (``a`` a transposed view): the dimensions ROW_BUCKET pads."""

    MATMULS = {torch.ops.aten.mm.default: 0, torch.ops.aten.mm.out: 0,
               torch.ops.aten.addmm.default: 1, torch.ops.aten.addmm.out: 1}

    def __init__(self, rows: list[int]):
        super().__init__()
        self.rows = rows

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = self.MATMULS.get(func)
        if first is not None and args[first].dtype == torch.bfloat16:
            a = args[first]
            transposed = a.dim() == 2 and a.stride(0) == 1 and a.shape[1] > 1
            self.rows.append(a.shape[1] if transposed else a.shape[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind,trainable", [("mlp", False), ("mlp", True), ("swiglu", True)])
def test_bf16_row_buckets_change_no_result(kind, trainable, monkeypatch):
    """CPU bf16 expert matmuls run on row counts rounded up to ROW_BUCKET (oneDNN builds a kernel per
    shape). The padded rows are other experts' tokens or zeros: outputs and every gradient, the weights'
    included (where a padded row would leak straight in), equal those of the unpadded loop."""
    import somoe.models.dispatch as dispatch_module

    monkeypatch.setattr(dispatch_module, "PADDED_MAX_WASTE", 0.0)  # the per-expert loop, not the bmm path
    ws = _swiglu_weights(26) if kind == "swiglu" else weights(seed=26, trainable=trainable)
    idx_TK, gates_TK = routing(seed=27)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(28), requires_grad=True)
    probe = torch.randn(T, D, generator=torch.Generator().manual_seed(29))
    inputs = [x, gates_TK, *(w for w in ws if w.requires_grad)]
    fn = (lambda s, c: grouped_swiglu(s, c, *ws)) if kind == "swiglu" else (lambda s, c: grouped_mlp(s, c, *ws))
    results = {}
    for bucket in (1, 32):
        monkeypatch.setattr(dispatch_module, "ROW_BUCKET", bucket)
        rows: list[int] = []
        with _MatmulRows(rows):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = dispatch(x, idx_TK, gates_TK, fn, E, torch.bfloat16)
            results[bucket] = (y, *grads(y, inputs, probe))
        assert len(rows) >= 4 * E and all(r % bucket == 0 for r in rows)
    assert T * K < E * 32  # so every slice is padded, and the last one past the buffer's end
    for got, want in zip(results[32], results[1]):
        assert (got.float() - want.float()).abs().max() <= 1e-2 * want.float().abs().max()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs PyTorch built with oneDNN")
@pytest.mark.parametrize("kind", ["frozen", "trainable", "lora"])
def test_expert_loop_runs_gelu_and_its_gradient_on_aten_kernels(capfd, kind):
    """oneDNN builds a kernel for every new tensor shape, and the loop's expert slices have a new row
    count at almost every training call, so their GELU and its gradient must not reach it: oneDNN's
    log shows no eltwise primitive for them. A GELU outside the loop is logged (the control)."""
    x = torch.randn(40, D, requires_grad=True)
    w1, b1, w2, b2 = weights(trainable=kind == "trainable")
    lora = None
    if kind == "lora":  # the LoRA ablation's plain-autograd loop
        g = torch.Generator().manual_seed(4)
        lora = LoRA(*(torch.randn(*shape, generator=g).requires_grad_(True)
                      for shape in ((E, D, 2), (E, 2, FF), (E, FF, 2), (E, 2, D))), scale=0.5)
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        grouped_mlp(x, [9, 13, 0, 11, 7], w1, b1, w2, b2, lora=lora).sum().backward()
        F.gelu(torch.randn(5, 7))
    eltwise = [line for line in capfd.readouterr().out.splitlines() if ",eltwise," in line]
    assert len(eltwise) == 1 and "5x7" in eltwise[0], eltwise
    assert x.grad is not None and torch.backends.mkldnn.enabled  # oneDNN is back on after the loop


@pytest.mark.parametrize("activation", [F.gelu, F.silu, lambda t: t * torch.tanh(t)], ids=["gelu", "silu", "custom"])
def test_activation_on_aten_kernels_has_the_activations_gradient(activation):
    """The LoRA loop's activation function (ATen kernels) passes gradcheck in fp64, whatever the activation."""
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _ActivationOnAten.apply(t, activation), (x,))
    assert torch.equal(_ActivationOnAten.apply(x, activation), activation(x))
