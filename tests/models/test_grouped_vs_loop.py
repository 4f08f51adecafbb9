"""The grouped path (device groups, one grouped matmul per expert op: what the GPU runs) against the
per-expert loop (host counts), forward and every gradient (input, gates, each expert weight), for
trainable GELU experts with biases (MoE), frozen ones (SoME) and SwiGLU experts. On the CPU in fp32 and
bf16, on CUDA in bf16 (skipped, with the reason, without a GPU)."""

from __future__ import annotations

import pytest
import torch

from somoe.models.dispatch import dispatch, grouped_mlp, grouped_swiglu

T, D, FF, E, K = 96, 16, 32, 6, 2  # 16-byte rows in bf16 and fp32: the grouped kernel's alignment
CUDA = pytest.param("cuda", torch.bfloat16, marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                     reason="needs a CUDA GPU"), id="cuda-bf16")
CASES = [pytest.param("cpu", torch.float32, id="cpu-fp32"), pytest.param("cpu", torch.bfloat16, id="cpu-bf16"), CUDA]
# fp32: the same sums in another order; bf16: both paths round every op's result to 8 significant bits, in
# different orders and row groupings, so each tensor within 2% of its largest entry
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _case(kind: str, device: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if kind == "swiglu":
        ws = [torch.randn(E, D, FF, generator=g) / D ** 0.5, torch.randn(E, D, FF, generator=g) / D ** 0.5,
              torch.randn(E, FF, D, generator=g) / FF ** 0.5]
    else:
        ws = [torch.randn(E, D, FF, generator=g) / D ** 0.5, torch.randn(E, FF, generator=g) * 0.1,
              torch.randn(E, FF, D, generator=g) / FF ** 0.5, torch.randn(E, D, generator=g) * 0.1]
    trainable = kind != "frozen"
    ws = [w.to(device, dtype).requires_grad_(trainable) for w in ws]
    idx_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    idx_TK[: T // 3, 0] = 0  # one busy expert, so that the groups differ in size
    idx_TK[: T // 3, 1] = torch.where(idx_TK[: T // 3, 1] == 0, 1, idx_TK[: T // 3, 1])
    gates_TK = torch.softmax(torch.randn(T, K, generator=g), -1)
    x_TD = torch.randn(T, D, generator=g)
    probe_TD = torch.randn(T, D, generator=g)
    return ws, idx_TK.to(device), gates_TK.to(device), x_TD.to(device, dtype), probe_TD.to(device, dtype)


def _run(kind, ws, idx_TK, gates_TK, x_TD, probe_TD, grouped: bool) -> dict[str, torch.Tensor]:
    x = x_TD.clone().requires_grad_(True)
    gates = gates_TK.clone().requires_grad_(True)
    fn = (lambda s, c: grouped_swiglu(s, c, *ws)) if kind == "swiglu" else (lambda s, c: grouped_mlp(s, c, *ws))
    y = dispatch(x, idx_TK, gates, fn, E, x.dtype, grouped=grouped)
    leaves = {"x": x, "gates": gates, **{f"w{i}": w for i, w in enumerate(ws) if w.requires_grad}}
    grads = torch.autograd.grad((y.float() * probe_TD.float()).sum(), list(leaves.values()))
    return {"y": y.detach(), **{f"d{name}": gr for name, gr in zip(leaves, grads)}}


@pytest.mark.parametrize("device, dtype", CASES)
@pytest.mark.parametrize("kind", ["trainable", "frozen", "swiglu"])
def test_grouped_path_matches_the_per_expert_loop(kind, device, dtype):
    case = _case(kind, device, dtype)
    loop = _run(kind, *case, grouped=False)
    grouped = _run(kind, *case, grouped=True)
    expected = {"y", "dx", "dgates"} | ({"dw0", "dw1", "dw2"} | ({"dw3"} if kind == "trainable" else set())
                                        if kind != "frozen" else set())
    assert set(loop) == set(grouped) == expected
    errors = {name: float((grouped[name].float() - ref.float()).abs().max() / ref.float().abs().max())
              for name, ref in loop.items()}
    assert all(ref.float().abs().max() > 0 for ref in loop.values())
    assert all(e <= TOLERANCE[dtype] for e in errors.values()), errors
