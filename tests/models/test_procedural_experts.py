"""Procedural frozen experts: the same numbers whatever the batch, thread count or process; moments of
the init method; distinct experts uncorrelated; checkpoints that hold none of them."""

import math
import subprocess
import sys

import pytest
import torch

from somoe.config import ModelConfig, SoMEConfig
from somoe.models.ffn import some_procedural
from somoe.models.ffn.some import SoMELayer
from somoe.models.ffn.some_experts import ExpertHashMismatch
from somoe.models.ffn.some_procedural import ProceduralExperts, gaussians, mix32


def experts(N=4096, d=32, m=16, method="normal", sparsity=0.0, seed=3, layer=2, rows=256) -> ProceduralExperts:
    p = ProceduralExperts(N, d, m, method, sparsity, seed, layer, rows)
    p.generate()
    return p


def test_hash_is_the_documented_integer_function():
    # mix32 by hand on one value: two rounds of (x ^ x >> 16) * 0x45d9f3b mod 2^32, then x ^ x >> 16
    x = 12345
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) % 2**32
    assert mix32(12345) == x ^ (x >> 16)
    assert int(mix32(torch.tensor([12345]))[0]) == mix32(12345)


def test_an_expert_is_the_same_in_any_batch():
    p = experts()
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[7, 4095, 7], [1, 2, 3], [4095, 0, 9], [100, 100, 100], [5, 6, 7]])
    gates = torch.rand(5, 3, generator=torch.Generator().manual_seed(1))
    together = p(x, ids, gates)
    for t in range(5):  # each token alone, its slots one at a time
        alone = sum(gates[t, s] * p(x[t:t + 1], ids[t:t + 1, s:s + 1], torch.ones(1, 1)) for s in range(3))
        assert torch.allclose(together[t], alone[0], atol=1e-6)
    w1, w2 = p.expert_weights(4095)
    assert torch.allclose(p(x[:1], torch.tensor([[4095]]), torch.ones(1, 1)),
                          torch.nn.functional.gelu(x[:1] @ w1) @ w2, atol=1e-6)


def test_the_same_numbers_on_any_thread_count_and_in_another_process():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = experts()
        torch.set_num_threads(2)
        two = experts()
    finally:
        torch.set_num_threads(threads)
    for name, buf in one.named_buffers():
        assert torch.equal(buf, dict(two.named_buffers())[name]), name
    code = ("from somoe.models.ffn.some_procedural import ProceduralExperts as P; "
            "p = P(4096, 32, 16, 'normal', 0.0, 3, 2, 256); p.generate(); print(p.digest())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(other.stdout) == one.digest()


@pytest.mark.parametrize("method,sparsity", [("normal", 0.0), ("sparse", 0.75)])
def test_moments_match_the_init_method(method, sparsity):
    p = experts(d=64, m=32, method=method, sparsity=sparsity)
    w1 = torch.stack([p.expert_weights(e)[0] for e in range(0, 4096, 16)]).double()  # 256 experts, 524k entries
    nonzero = w1[w1 != 0]
    assert abs(float(w1.mean())) < 0.02 * 1 / math.sqrt(64)
    expected_std = 1 / math.sqrt(64 * (1 - sparsity))
    assert abs(float(nonzero.std()) / expected_std - 1) < 0.02
    assert abs(float(nonzero.mean())) < 0.02 * expected_std
    assert abs(float((w1 == 0).double().mean()) - sparsity) < 1e-9  # exact zeros per column, per expert
    z = gaussians(200_000, key=99)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert abs(float((z ** 4).mean()) - 3) < 0.06  # Gaussian, not just unit variance


def test_distinct_experts_are_uncorrelated():
    d, m = 32, 16
    p = experts(d=d, m=m)
    flat = torch.stack([torch.cat([w.flatten() for w in p.expert_weights(e)]) for e in range(300)]).double()
    flat = flat - flat.mean(1, keepdim=True)
    unit = flat / flat.norm(dim=1, keepdim=True)
    corr = (unit @ unit.t())[~torch.eye(300, dtype=torch.bool)]
    se = corr.std() / math.sqrt(corr.numel())
    assert abs(float(corr.mean())) < 4 * float(se) + 1e-3  # zero mean correlation
    # spread: sign flips of a shared matrix pair give sqrt(E[w^4]) / E[w^2] = sqrt(3) times the spread of
    # independent Gaussians (1/sqrt(2 d m)); a shared pattern would show far above it
    assert float(corr.std()) < 1.2 * math.sqrt(3) / math.sqrt(2 * d * m)
    assert float(corr.abs().max()) < 0.5


def _layer(N: int, version: str | None = None) -> SoMELayer:
    c = SoMEConfig(num_experts=N, top_k=4, d_ffn=16, init_method="normal", router="product", pk_heads=2,
                   pk_dim=16, expert_storage="procedural", expert_bias=False)
    return SoMELayer(ModelConfig(d_model=64, n_heads=1, ffn="some", some=c), layer_idx=0)


def test_checkpoint_size_does_not_grow_with_the_pool():
    def size(N):
        return sum(t.numel() * t.element_size() for t in _layer(N).state_dict().values())

    small, large = size(1024), size(1_048_576)
    assert large - small <= 5 * 2**20, (small, large)  # sub-keys grow with sqrt(N) only
    assert _layer(1_048_576).procedural_param_count() == 1_048_576 * 2 * 64 * 16


def test_loading_under_another_generator_fails(monkeypatch):
    state = _layer(1024).state_dict()
    monkeypatch.setattr(some_procedural, "GENERATOR_VERSION", "somoe-signbank-mix32-v0")
    other = _layer(1024)
    with pytest.raises(ExpertHashMismatch, match="generator"):
        other.load_state_dict(state)
