"""Generation: sampling filters, batched KV-cached decoding, text wrapper, REPL."""

from __future__ import annotations

import math

import pytest
import torch

from somoe.config import ModelConfig
from somoe.generate.sampling import GenerationConfig, filter_logits, generate_ids, generate_text, interactive, sample_next
from somoe.models import build_model

VOCAB, EOS, PAD = 50, 0, 1
GREEDY = GenerationConfig(greedy=True, stop_at_eos=False, max_new_tokens=8)


def tiny_model(backbone="gpt2", positions="learned", max_seq_len=32, init_std=0.1, **extra):
    cfg = ModelConfig(backbone=backbone, positions=positions, vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4,
                      max_seq_len=max_seq_len, init_std=init_std,
                      activation="swiglu" if backbone == "smollm" else "gelu", **extra)
    cfg.validate()
    torch.manual_seed(0)
    return build_model(cfg).eval()


class CharTokenizer:
    """A character-level stand-in for the BPE tokenizer: ids 2.. are letters, 0 = EOS, 1 = PAD."""

    ALPHABET = "abcdefghijklmnopqrstuvwxyz .,!?"
    eos_id, pad_id = EOS, PAD

    def encode(self, text: str) -> list[int]:
        return [2 + self.ALPHABET.index(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        chars = {2 + i: c for i, c in enumerate(self.ALPHABET)}
        return "".join(chars.get(i, "#") for i in ids if i not in (EOS, PAD))


@torch.no_grad()
def naive_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by recomputing the whole sequence at every step (no cache)."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(model(torch.tensor([seq])).logits[0, -1].argmax().item())
    return seq[len(prompt):]


# --- filters and sampling -----------------------------------------------------------
PROBS = [0.4, 0.1, 0.3, 0.15, 0.05]  # sorted: 0 (0.4), 2 (0.3), 3 (0.15), 1 (0.1), 4 (0.05)


def kept(logits_V: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits_V)).flatten().tolist())


@pytest.mark.parametrize("top_k,top_p,expected", [
    (2, 1.0, {0, 2}),
    (1, 1.0, {0}),
    (0, 1.0, {0, 1, 2, 3, 4}),  # both off
    (0, 0.5, {0, 2}),  # 0.4 < 0.5 <= 0.4 + 0.3
    (0, 0.75, {0, 2, 3}),  # 0.7 < 0.75 <= 0.85
    (0, 0.3, {0}),  # the top token alone has 0.4 >= 0.3
    (0, 0.0, {0}),  # never empty
    (3, 0.8, {0, 2}),  # top-k first: renormalized 0.47, 0.35, 0.18 -> 0.82 >= 0.8
    (0, 0.8, {0, 2, 3}),  # without top-k the same p needs three tokens (0.85)
])
def test_filter_logits_keeps_the_expected_set(top_k, top_p, expected):
    logits_1V = torch.tensor([PROBS]).log()
    out_1V = filter_logits(logits_1V, top_k, top_p)
    assert kept(out_1V[0]) == expected
    survivors = sorted(expected)
    assert torch.equal(out_1V[0, survivors], logits_1V[0, survivors])  # kept logits are untouched
    assert torch.equal(logits_1V, torch.tensor([PROBS]).log())  # input not modified in place


def test_filter_logits_works_per_row():
    logits_2V = torch.tensor([PROBS, PROBS[::-1]]).log()
    out_2V = filter_logits(logits_2V, top_k=0, top_p=0.5)
    assert kept(out_2V[0]) == {0, 2} and kept(out_2V[1]) == {4, 2}


def test_sampling_respects_the_filter_and_greedy_is_argmax():
    logits_BV = torch.tensor([PROBS] * 400).log()
    g = torch.Generator().manual_seed(0)
    drawn = sample_next(logits_BV, GenerationConfig(top_k=2), g)
    assert set(drawn.tolist()) == {0, 2}
    share_0 = (drawn == 0).float().mean().item()  # 0.4 / 0.7 = 0.571 after renormalization
    assert abs(share_0 - 0.4 / 0.7) < 0.08
    assert sample_next(logits_BV[:3], GenerationConfig(greedy=True)).tolist() == [0, 0, 0]
    assert sample_next(logits_BV[:3], GenerationConfig(temperature=0.0)).tolist() == [0, 0, 0]


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    model = tiny_model(init_std=0.02)  # near-uniform next-token distributions
    prompts = [[EOS, 5, 6], [EOS, 7]]

    def run(seed):
        gen = GenerationConfig(max_new_tokens=20, temperature=1.0, seed=seed, stop_at_eos=False)
        return generate_ids(model, prompts, gen, EOS, PAD)

    first = run(123)
    assert [len(r) for r in first] == [20, 20]
    assert run(123) == first
    assert run(124) != first


# --- decoding -------------------------------------------------------------------------
def test_greedy_matches_naive_full_recompute_and_restores_train_mode():
    model = tiny_model(dropout=0.3).train()  # dropout is on in train mode: generation must switch it off
    prompt = [EOS, 11, 12, 13]
    gen = GenerationConfig(greedy=True, stop_at_eos=False, max_new_tokens=12)
    out = generate_ids(model, [prompt], gen, EOS, PAD)[0]
    assert model.training
    model.eval()
    assert out == naive_greedy(model, prompt, 12)
    assert len(set(out)) > 1  # a non-trivial continuation


BATCH_CONFIGS = [("gpt2", "learned"), ("gpt2", "sinusoidal"), ("gpt2", "rope"), ("gpt2", "none"), ("smollm", "rope")]
PROMPTS = [[EOS, 5, 6, 7], [EOS], [EOS, 9, 10, 11, 12, 13, 14, 15], [3, 4]]


@pytest.mark.parametrize("backbone,positions", BATCH_CONFIGS)
def test_left_padded_batch_equals_each_prompt_alone(backbone, positions):
    model = tiny_model(backbone, positions)
    batched = generate_ids(model, PROMPTS, GREEDY, EOS, PAD)
    alone = [generate_ids(model, [p], GREEDY, EOS, PAD)[0] for p in PROMPTS]
    assert batched == alone
    assert alone[0] == naive_greedy(model, PROMPTS[0], 8)
    assert len({tuple(r) for r in alone}) > 1  # the rows really differ


def test_rows_stop_at_their_own_eos():
    model = tiny_model()
    full = generate_ids(model, PROMPTS, GREEDY, EOS, PAD)
    eos = full[0][2]  # pretend the 3rd token of row 0 is EOS: row 0 stops early, others may not
    gen = GenerationConfig(greedy=True, stop_at_eos=True, max_new_tokens=8)
    expected = [r[:r.index(eos)] if eos in r else r for r in full]
    assert len(expected[0]) <= 2 and max(len(r) for r in expected) == 8
    assert generate_ids(model, PROMPTS, gen, eos, PAD) == expected


def test_context_budget_truncates_prompt_and_caps_new_tokens():
    model = tiny_model(max_seq_len=16)  # learned positions: an index >= 16 would raise
    prompt = list(range(2, 22))  # 20 tokens, longer than the context
    out = generate_ids(model, [prompt, [EOS, 3]], GREEDY, EOS, PAD)
    # 8 new tokens leave room for the last 16 - 8 = 8 prompt tokens
    assert out[0] == naive_greedy(model, prompt[-8:], 8)
    assert out[1] == naive_greedy(model, [EOS, 3], 8)
    capped = generate_ids(model, [prompt], GenerationConfig(greedy=True, stop_at_eos=False, max_new_tokens=100),
                          EOS, PAD)[0]
    assert capped == naive_greedy(model, prompt[-1:], 15)  # at most max_seq_len - 1 new tokens


def test_generate_text_prefixes_eos_and_returns_the_continuation():
    model, tok = tiny_model(), CharTokenizer()
    gen = GenerationConfig(greedy=True, max_new_tokens=10, stop_at_eos=False)
    texts = generate_text(model, tok, ["once upon", "a"], gen)
    ids = generate_ids(model, [[EOS] + tok.encode("once upon"), [EOS] + tok.encode("a")], gen, EOS, PAD)
    assert texts == [tok.decode(i) for i in ids]
    assert all(len(t) == 10 for t in texts)  # these greedy continuations hold no EOS/PAD (decoded to "")
    assert generate_ids(model, [[EOS]], GenerationConfig(max_new_tokens=0), EOS, PAD) == [[]]


# --- REPL -------------------------------------------------------------------------------
def scripted(lines):
    """An input_fn that replays ``lines`` then raises EOFError, recording how many were read."""
    state = {"read": 0}

    def input_fn(_prompt=""):
        if state["read"] == len(lines):
            raise EOFError
        state["read"] += 1
        return lines[state["read"] - 1]

    return input_fn, state


def test_interactive_changes_settings_and_stops_on_quit():
    model, tok = tiny_model(), CharTokenizer()
    lines = ["/temp 0.5", "/topk 5", "/topp 0.9", "/max 6", "/greedy", "/seed 7", "/temp abc", "", "hello",
             "/quit", "never read"]
    input_fn, state = scripted(lines)
    printed = []
    final = interactive(model, tok, GenerationConfig(), input_fn=input_fn, print_fn=printed.append)
    assert state["read"] == 10  # stopped at /quit
    assert (final.temperature, final.top_k, final.top_p, final.max_new_tokens, final.greedy, final.seed) == \
        (0.5, 5, 0.9, 6, True, 7)
    assert any("bad value 'abc'" in p for p in printed)
    expected = "hello" + generate_text(model, tok, ["hello"], final)[0]
    assert printed[-1] == expected and len(expected) > len("hello")


def test_interactive_ends_at_eof_and_greedy_toggles():
    input_fn, state = scripted(["/greedy", "/greedy", "/seed none", "/max 3"])
    final = interactive(tiny_model(), CharTokenizer(), GenerationConfig(seed=1), input_fn=input_fn,
                        print_fn=lambda *a: None)
    assert state["read"] == 4
    assert final.greedy is False and final.seed is None and final.max_new_tokens == 3
