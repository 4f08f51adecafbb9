"""Text generation: sampling filters, batched KV-cached decoding, a prompt REPL.

``generate_ids`` works on token ids: prompts of different lengths are
left-padded into one batch, prefilled in a single forward that fills the KV
cache, then decoded one token per forward. Each row's position ids count only
its real tokens, and padding keys are masked out, so a padded row computes the
same thing it would compute alone. ``generate_text`` wraps it with a tokenizer
and ``interactive`` is the ``somoe generate --interactive`` loop.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Protocol

import torch
from torch import nn

from ..config import ConfigError
from ..models.layers import KVCache


@dataclass
class GenerationConfig:
    max_new_tokens: int = 200
    temperature: float = 1.0  # logits are divided by it; 0 means greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus: keep the smallest set with probability mass >= top_p; 1 = off
    greedy: bool = False  # argmax instead of sampling (ignores temperature/top_k/top_p)
    seed: int | None = None  # seed of the sampling generator; None = fresh randomness each call
    stop_at_eos: bool = True  # stop a row at EOS (EOS itself is not returned)

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "top_k", "temperature"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)} must not be negative")


class Tokenizer(Protocol):
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


# --- sampling -----------------------------------------------------------------
def filter_logits(logits_BV: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus filtering: removed tokens get ``-inf``; at least one token survives.

    Nucleus keeps, per row, the smallest prefix of the tokens sorted by
    probability (after top-k) whose mass reaches ``top_p``.
    """
    logits_BV = logits_BV.clone()
    V = logits_BV.shape[-1]
    if 0 < top_k < V:
        # by index rather than by threshold, so ties at the k-th value keep exactly k
        keep_BK = torch.topk(logits_BV, top_k, dim=-1).indices
        drop_BV = torch.ones_like(logits_BV, dtype=torch.bool).scatter(-1, keep_BK, False)
        logits_BV[drop_BV] = float("-inf")
    if top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
        probs_BV = torch.softmax(sorted_BV.float(), dim=-1)
        mass_before_BV = probs_BV.cumsum(dim=-1) - probs_BV
        # a token is dropped once the tokens ahead of it already reach top_p;
        # the most likely one is always kept so a row never empties (even top_p <= 0)
        drop_BV = mass_before_BV >= top_p
        drop_BV[..., 0] = False
        logits_BV[drop_BV.scatter(-1, order_BV, drop_BV)] = float("-inf")
    return logits_BV


def sample_next(logits_BV: torch.Tensor, cfg: GenerationConfig,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row, shape (B,): argmax when greedy (or temperature 0), else a sample."""
    if cfg.greedy or cfg.temperature <= 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = filter_logits(logits_BV.float() / cfg.temperature, cfg.top_k, cfg.top_p)
    probs_BV = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()  # non-deterministic
    else:
        g.manual_seed(seed)
    return g


# --- decoding -------------------------------------------------------------------
def _budget(prompts: list[list[int]], max_new_tokens: int, max_seq_len: int) -> tuple[list[list[int]], int]:
    """Cap the new tokens at ``max_seq_len - 1`` and keep only the prompt tails that leave room for them."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (generate_text prefixes EOS)")
    new = max(0, min(max_new_tokens, max_seq_len - 1))
    keep = max_seq_len - new
    return [p[-keep:] for p in prompts], new


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, validity and per-row position ids (real tokens before each), all (B, T)."""
    T = max(len(p) for p in prompts)
    idx_BT = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    valid_BT = torch.zeros(len(prompts), T, dtype=torch.bool)
    for row, p in enumerate(prompts):
        idx_BT[row, T - len(p):] = torch.tensor(p, dtype=torch.long)
        valid_BT[row, T - len(p):] = True
    # padding sits at position 0 (it is masked out anyway); real tokens count 0, 1, ...
    pos_BT = (valid_BT.long().cumsum(dim=1) - 1).clamp(min=0)
    return idx_BT.to(device), valid_BT.to(device), pos_BT.to(device)


def _new_cache(model: nn.Module, batch: int, max_len: int) -> KVCache:
    cfg = model.cfg
    param = next(model.parameters())
    return KVCache(cfg.n_layers, batch, cfg.n_heads, max_len, cfg.head_dim, param.device, param.dtype)


def _trim(tokens: list[int], eos_id: int, stop_at_eos: bool) -> list[int]:
    if stop_at_eos and eos_id in tokens:
        return tokens[:tokens.index(eos_id)]
    return tokens


@torch.inference_mode()  # cheaper than no_grad per op: no version counters, no view tracking
def generate_ids(model: nn.Module, prompts: list[list[int]], gen: GenerationConfig, eos_id: int,
                 pad_id: int) -> list[list[int]]:
    """Continue each prompt; returns only the new tokens (cut before EOS when ``gen.stop_at_eos``).

    The context never exceeds ``model.cfg.max_seq_len``: the new tokens are
    capped at ``max_seq_len - 1`` and prompts longer than the room left
    (``max_seq_len - new tokens``) lose their oldest tokens. The batch stops
    once every row has produced EOS (with ``stop_at_eos``) or the token budget
    is spent. The model runs in eval mode; its previous mode is restored.
    """
    if not prompts:
        return []
    prompts, max_new = _budget(prompts, gen.max_new_tokens, model.cfg.max_seq_len)
    if max_new == 0:
        return [[] for _ in prompts]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return _decode(model, prompts, gen, max_new, eos_id, pad_id, device)
    finally:
        model.train(was_training)


def _decode(model, prompts, gen, max_new, eos_id, pad_id, device) -> list[list[int]]:
    generator = _generator(gen.seed, device)
    idx_BT, valid_BT, pos_BT = _left_pad(prompts, pad_id, device)
    B, T = idx_BT.shape
    cache = _new_cache(model, B, T + max_new)
    cache.append_valid(valid_BT)
    logits_BV = model(idx_BT, cache=cache, pos_BT=pos_BT, last_only=True).logits[:, -1]
    next_pos_B1 = pos_BT[:, -1:] + 1  # every row ends with a real token
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    out_BN = []
    for step in range(max_new):
        next_B = sample_next(logits_BV, gen, generator)
        out_BN.append(next_B)
        if gen.stop_at_eos:
            done_B |= next_B == eos_id
            if bool(done_B.all()):
                break
        if step == max_new - 1:
            break  # the last token needs no forward
        cache.append_valid(torch.ones(B, 1, dtype=torch.bool, device=device))
        logits_BV = model(next_B[:, None], cache=cache, pos_BT=next_pos_B1).logits[:, -1]
        next_pos_B1 = next_pos_B1 + 1
    rows = torch.stack(out_BN, dim=1).tolist()
    return [_trim(row, eos_id, gen.stop_at_eos) for row in rows]


# --- text -----------------------------------------------------------------------
def generate_text(model: nn.Module, tokenizer: Tokenizer, prompts: list[str], gen: GenerationConfig) -> list[str]:
    """The continuation (without the prompt) of each prompt.

    Every prompt is prefixed with EOS because the training streams start each
    story right after an EOS: "EOS + prompt" is what the start of a story looks
    like to the model (and an empty prompt becomes a fresh story).
    """
    prompt_ids = [[tokenizer.eos_id] + tokenizer.encode(p) for p in prompts]
    new_ids = generate_ids(model, prompt_ids, gen, tokenizer.eos_id, tokenizer.pad_id)
    return [_continuation(tokenizer, p, n) for p, n in zip(prompt_ids, new_ids)]


def _continuation(tokenizer: Tokenizer, prompt: list[int], new: list[int]) -> str:
    # decode prompt+new together so characters spanning the boundary (multi-byte
    # UTF-8 split across tokens) come out whole, then drop the decoded prompt
    head, full = tokenizer.decode(prompt), tokenizer.decode(prompt + new)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(new)


# --- REPL -------------------------------------------------------------------------
HELP = ("commands: /temp X  /topk N  /topp X  /max N  /greedy (toggle)  /seed N|none  /show  /help  /quit\n"
        "anything else is a prompt")

_SETTINGS: dict[str, tuple[str, Callable[[str], object]]] = {
    "/temp": ("temperature", float),
    "/topk": ("top_k", int),
    "/topp": ("top_p", float),
    "/max": ("max_new_tokens", int),
    "/seed": ("seed", lambda s: None if s.lower() == "none" else int(s)),
}


def _describe(gen: GenerationConfig) -> str:
    return (f"temperature={gen.temperature} top_k={gen.top_k} top_p={gen.top_p} "
            f"max_new_tokens={gen.max_new_tokens} greedy={gen.greedy} seed={gen.seed}")


def _command(line: str, gen: GenerationConfig) -> tuple[GenerationConfig, str]:
    """Apply one ``/command``; returns the new settings and the message to print."""
    name, _, arg = line.partition(" ")
    if name == "/greedy":
        gen = replace(gen, greedy=not gen.greedy)
        return gen, _describe(gen)
    if name == "/show":
        return gen, _describe(gen)
    if name in _SETTINGS:
        field_name, parse = _SETTINGS[name]
        try:
            gen = replace(gen, **{field_name: parse(arg.strip())})
        except ValueError:
            return gen, f"bad value {arg.strip()!r} for {name}"
        return gen, _describe(gen)
    return gen, HELP


def interactive(model: nn.Module, tokenizer: Tokenizer, gen: GenerationConfig,
                input_fn: Callable[[str], str] = input, print_fn: Callable[..., None] = print) -> GenerationConfig:
    """Read prompts and print their continuations until ``/quit`` or end of input.

    Lines starting with ``/`` change settings (see ``HELP``); returns the final settings.
    """
    print_fn(HELP)
    print_fn(_describe(gen))
    while True:
        try:
            line = input_fn("> ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if line in ("/quit", "/exit"):
            break
        if not line:
            continue
        if line.startswith("/"):
            gen, message = _command(line, gen)
            print_fn(message)
            continue
        print_fn(line + generate_text(model, tokenizer, [line], gen)[0])
    return gen
