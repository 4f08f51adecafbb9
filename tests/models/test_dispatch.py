"""Dropless dispatch against a naive per-token loop: values, gradients, dtypes, frozen weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from somoe.models.dispatch import (_padded_layout_if_faster, compute_dtype, dispatch, grouped_mlp, padded_frozen_mlp,
                                   padded_layout, per_expert, plan)

T, D, E, K, FF = 37, 8, 6, 3, 12


def make_experts(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w1 = (torch.randn(E, D, FF, generator=g) / D ** 0.5).to(dtype)
    b1 = (torch.randn(E, FF, generator=g) * 0.1).to(dtype)
    w2 = (torch.randn(E, FF, D, generator=g) / FF ** 0.5).to(dtype)
    b2 = (torch.randn(E, D, generator=g) * 0.1).to(dtype)
    return w1, b1, w2, b2


def make_routing(seed=1, skip_expert=None):
    g = torch.Generator().manual_seed(seed)
    weights = torch.ones(E)
    if skip_expert is not None:
        weights[skip_expert] = 0.0  # that expert gets no token at all
    idx_TK = torch.stack([torch.multinomial(weights, K, generator=g) for _ in range(T)])
    gates_TK = torch.softmax(torch.randn(T, K, generator=g), -1)
    return idx_TK, gates_TK


def slot_counts(idx_TK):
    return torch.bincount(idx_TK.flatten(), minlength=E).tolist()


def naive(x_TD, idx_TK, gates_TK, w1, b1, w2, b2):
    """One token at a time, one slot at a time, in fp32."""
    rows = []
    for t in range(x_TD.shape[0]):
        y = torch.zeros(D)
        for j in range(idx_TK.shape[1]):
            e = int(idx_TK[t, j])
            h = F.gelu(x_TD[t] @ w1[e].float() + b1[e].float())
            y = y + gates_TK[t, j] * (h @ w2[e].float() + b2[e].float())
        rows.append(y)
    return torch.stack(rows)


def test_plan_sorts_slots_by_expert_stably():
    idx_TK = torch.tensor([[2, 0], [0, 1], [2, 1]])
    p = plan(idx_TK, 4)
    # flattened slots: 0:e2 1:e0 2:e0 3:e1 4:e2 5:e1 -> sorted by expert, ties in slot order
    assert p.order_S.tolist() == [1, 2, 3, 5, 0, 4]
    assert p.token_S.tolist() == [0, 1, 1, 2, 0, 2]
    assert p.expert_S.tolist() == [0, 0, 1, 1, 2, 2]
    assert p.counts == [2, 2, 2, 0]


@pytest.mark.parametrize("skip_expert", [None, 4])
def test_matches_naive_loop_fp32(skip_expert):
    w1, b1, w2, b2 = make_experts()
    idx_TK, gates_TK = make_routing(skip_expert=skip_expert)
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(2))
    y_TD = dispatch(x_TD, idx_TK, gates_TK, lambda x, c: grouped_mlp(x, c, w1, b1, w2, b2), E)
    assert torch.allclose(y_TD, naive(x_TD, idx_TK, gates_TK, w1, b1, w2, b2), atol=1e-5, rtol=0)


def test_input_gradient_matches_naive_and_frozen_weights_get_none():
    w1, b1, w2, b2 = make_experts()
    idx_TK, gates_TK = make_routing()
    gates_TK.requires_grad_(True)
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(3), requires_grad=True)
    probe_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(4))
    y = dispatch(x_TD, idx_TK, gates_TK, lambda x, c: grouped_mlp(x, c, w1, b1, w2, b2), E)
    gx, gg = torch.autograd.grad((y * probe_TD).sum(), (x_TD, gates_TK))
    x_ref = x_TD.detach().clone().requires_grad_(True)
    g_ref = gates_TK.detach().clone().requires_grad_(True)
    gx_ref, gg_ref = torch.autograd.grad((naive(x_ref, idx_TK, g_ref, w1, b1, w2, b2) * probe_TD).sum(), (x_ref, g_ref))
    assert torch.allclose(gx, gx_ref, atol=1e-5) and torch.allclose(gg, gg_ref, atol=1e-5)
    assert all(w.grad is None and not w.requires_grad for w in (w1, b1, w2, b2))


def test_bf16_weights_compute_in_bf16_and_return_input_dtype():
    w1, b1, w2, b2 = make_experts(torch.bfloat16)
    idx_TK, gates_TK = make_routing()
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(5))
    y_TD = dispatch(x_TD, idx_TK, gates_TK, lambda x, c: grouped_mlp(x, c, w1, b1, w2, b2), E)
    ref_TD = naive(x_TD, idx_TK, gates_TK, w1, b1, w2, b2)  # same bf16 weights, fp32 math
    assert y_TD.dtype == torch.float32
    assert (y_TD - ref_TD).abs().max() < 0.05 * ref_TD.abs().max()  # bf16 activations: ~3 significant digits
    assert not torch.equal(y_TD, ref_TD)  # it really computed in bf16


@pytest.mark.parametrize("fold_gates", [False, True])
@pytest.mark.parametrize("group,chunk", [(2, 512), (8, 512), (2, 4)])
def test_padded_bmm_and_per_expert_agree_with_grouped_loop(fold_gates, group, chunk):
    """The padded-bmm path (bf16 frozen experts on CPU) computes the loop's function and gradients;
    fp32 here so that they agree to rounding. Groups of 2 sort the experts by load into three
    groups (weights gathered out of order); 8 puts all in one; pieces of 4 rows split every expert
    (its weights gathered once per piece). The empty expert is never read."""
    w1, b1, w2, b2 = make_experts()
    idx_TK, gates_TK = make_routing(skip_expert=2)
    gates_TK = gates_TK.detach().requires_grad_(True)
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(6), requires_grad=True)
    probe = torch.randn(T, D, generator=torch.Generator().manual_seed(7))
    layouts = []

    def padded(x_SD, counts):
        gates_S = None
        if fold_gates:
            gates_S, counts.gates_applied = counts.gates_S, True
        layouts.append(padded_layout(list(counts), group=group, bucket=4, chunk=chunk))
        return padded_frozen_mlp(x_SD, layouts[-1], w1, b1, w2, b2, gates_S=gates_S)

    outs = {}
    for name, fn in (("loop", lambda x, c: grouped_mlp(x, c, w1, b1, w2, b2)), ("padded", padded)):
        y = dispatch(x_TD, idx_TK, gates_TK, fn, E)
        outs[name] = (y, *torch.autograd.grad((y * probe).sum(), [x_TD, gates_TK]))
    calls = []

    def one(e, x):
        calls.append(e)
        return F.gelu(x @ w1[e] + b1[e]) @ w2[e] + b2[e]

    looped = dispatch(x_TD, idx_TK, gates_TK, per_expert(one), E)
    for got, want in zip(outs["padded"], outs["loop"]):
        assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(outs["loop"][0], looped, atol=1e-6)
    assert calls == [0, 1, 3, 4, 5]  # the empty expert is skipped
    (layout,) = layouts
    experts = layout.experts.tolist()
    assert 2 not in experts
    if chunk == 4:  # every expert's ~22 slots in pieces of 4
        assert len(experts) == sum(-(-n // 4) for n in slot_counts(idx_TK)) > E
    else:
        assert len(layout.groups) == (3 if group == 2 else 1)
    if group == 2:
        assert experts != sorted(experts)  # the weights really were permuted


def test_padded_layout_by_hand():
    """counts [5, 0, 9, 3, 7], groups of 2, caps rounded up to 4: busiest first, 2 and 4 padded to 12
    rows (9 -> 12), then 0 and 3 to 8 (5 -> 8); expert 1 is empty and gets nothing."""
    layout = padded_layout([5, 0, 9, 3, 7], group=2, bucket=4)
    assert layout.experts.tolist() == [2, 4, 0, 3]
    assert layout.groups == [(0, 2, 12, 0), (2, 4, 8, 24)]
    assert layout.rows == 40
    # sorted slots come expert by expert: 0 (5 slots), 2 (9), 3 (3), 4 (7)
    want = [24, 25, 26, 27, 28] + list(range(0, 9)) + [32, 33, 34] + list(range(12, 19))
    assert layout.pos_S.tolist() == want
    slot_R = layout.slot_R.tolist()
    assert [slot_R[p] for p in want] == list(range(24))
    padding = sorted(set(range(40)) - set(want))
    assert all(slot_R[r] == 0 for r in padding)  # padding rows copy slot 0 (row-wise ops: never read back)


def test_padded_layout_pieces_by_hand():
    """The same counts in pieces of 4 rows, no rounding: expert 0 -> pieces of 4 and 1, expert 2 -> 4,
    4, 1, expert 3 -> 3, expert 4 -> 4, 3. Sorted by size (stable) into groups of 2, every group is
    full: nothing is padded, and each slot lands in its piece at its rank within the piece."""
    layout = padded_layout([5, 0, 9, 3, 7], group=2, bucket=1, chunk=4)
    assert layout.experts.tolist() == [0, 2, 2, 4, 3, 4, 0, 2]
    assert layout.groups == [(0, 2, 4, 0), (2, 4, 4, 8), (4, 6, 3, 16), (6, 8, 1, 22)]
    assert layout.rows == 24
    assert layout.pos_S.tolist() == [0, 1, 2, 3, 22,  # expert 0: its first piece, then its 1-row piece
                                     4, 5, 6, 7, 8, 9, 10, 11, 23,  # expert 2
                                     16, 17, 18,  # expert 3
                                     12, 13, 14, 15, 19, 20, 21]  # expert 4


def test_busy_experts_run_as_pieces_of_at_most_the_chunk():
    """Pieces bound every group's cap by PADDED_CHUNK (512): oneDNN keeps memory for every bmm shape it
    has seen, so the caps must not follow the busiest expert's count. 2000 slots -> 512 x 3 + 464,
    700 -> 512 + 188, 30; in groups of 4 the four full pieces fill one group with no padding."""
    layout = padded_layout([2000, 700, 30], group=4, bucket=32, chunk=512)
    assert layout.experts.tolist() == [0, 0, 0, 1, 0, 1, 2]
    assert layout.groups == [(0, 4, 512, 0), (4, 7, 480, 2048)]  # 464 rounded up to 480
    assert layout.rows == 2048 + 3 * 480
    assert int((layout.pos_S < 2048).sum()) == 2048  # the first group's rows are all real slots
    assert max(cap for _, _, cap, _ in padded_layout([9000, 40]).groups) == 512  # the defaults


def test_padded_path_refuses_padding_far_beyond_the_loops_rows(monkeypatch):
    """One busy expert among quiet ones: its group (all 6, PADDED_GROUP 8) would pad 5 experts from 32 to
    96 rows (576 rows against the loop's 256 at ROW_BUCKET 32), so the per-expert loop runs; balanced
    counts take the bmm. fp32 takes it only for experts of at most FP32_PADDED_MAX_EXPERT_ELEMENTS."""
    import somoe.models.dispatch as dispatch_module

    x = torch.zeros(1, D, dtype=torch.bfloat16)
    weights = make_experts(torch.bfloat16)
    lopsided = _padded_layout_if_faster(x, [80] + [5] * 5, torch.bfloat16, weights)
    balanced = _padded_layout_if_faster(x, [80, 70, 90, 65, 75, 85], torch.bfloat16, weights)
    assert lopsided is None
    assert balanced is not None and balanced.rows == 6 * 96
    x32, weights32 = x.float(), make_experts()
    assert _padded_layout_if_faster(x32, [80] * 6, torch.float32, weights32).rows == 6 * 96  # D * FF = 96 elements
    monkeypatch.setattr(dispatch_module, "FP32_PADDED_MAX_EXPERT_ELEMENTS", D * FF - 1)
    assert _padded_layout_if_faster(x32, [80] * 6, torch.float32, weights32) is None  # larger experts: the loop
    assert _padded_layout_if_faster(x, [80] * 6, torch.bfloat16, weights) is not None  # bf16 whatever the size
    assert _padded_layout_if_faster(x.half(), [80] * 6, torch.float16, make_experts(torch.float16)) is None


def test_inside_autocast_the_experts_run_in_the_autocast_dtype():
    w1, b1, w2, b2 = make_experts()
    idx_TK, gates_TK = make_routing()
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(7))
    seen = []

    def fn(x, c):
        seen.append(x.dtype)
        return grouped_mlp(x, c, w1, b1, w2, b2)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_TD = dispatch(x_TD, idx_TK, gates_TK, fn, E, compute_dtype(x_TD, w1.dtype))
    assert seen == [torch.bfloat16] and y_TD.dtype == torch.float32
    assert (y_TD - naive(x_TD, idx_TK, gates_TK, w1, b1, w2, b2)).abs().max() < 0.05


@pytest.mark.parametrize("capability, sync_free", [((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True),
                                                   ((12, 0), False)], ids=["A100", "Ada", "H100", "B200", "RTX50"])
def test_grouped_matmul_only_on_gpus_whose_kernel_is_sync_free(monkeypatch, capability, sync_free):
    """torch's grouped matmul runs its CUTLASS kernel on SM 9.x/10.x only; elsewhere its fallback reads
    the offsets on the host, which a CUDA graph cannot capture: those GPUs take host counts (the loop)."""
    from somoe.models.dispatch import grouped_mm_available

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda")
    assert grouped_mm_available(cuda, torch.bfloat16) is sync_free
    assert not grouped_mm_available(cuda, torch.float32)  # the kernel is bf16-only
    assert not grouped_mm_available(torch.device("cpu"), torch.bfloat16)
