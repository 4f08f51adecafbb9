"""Tiny trained runs of every FFN kind on both backbones, with their weights pushed far from
initialisation (routers, LoRA adapters and LayerScale would otherwise sit near their no-op
starting values, and a missing piece in an export would go unnoticed)."""

from __future__ import annotations

import torch

from helpers import TINY
from somoe.config import load_config
from somoe.evaluate.runs import load_run
from somoe.train.checkpoint import read_trainer_state, save_checkpoint
from somoe.train.trainer import Trainer

SMOLLM = ["model.backbone=smollm", "model.positions=rope", "model.activation=swiglu", "model.bias=false"]
SOME = ["model.ffn=some", "model.some.num_experts=8", "model.some.top_k=2", "model.some.d_ffn=32"]
SOME_PK = ["model.ffn=some", "model.some.router=product", "model.some.num_experts=16", "model.some.top_k=2",
           "model.some.pk_heads=2", "model.some.pk_dim=4", "model.some.d_ffn=32", "model.some.expert_bias=false",
           "model.some.expert_storage=procedural", "model.some.sign_bank_rows=64", "model.some.selection_bias_rate=0.05",
           "model.some.query_batchnorm=true", "model.some.query_net=mlp", "model.some.topk_warmup=0",
           "model.some.gamma=0", "model.some.init_method=normal"]
MOE = ["model.ffn=moe", "model.moe.num_experts=4", "model.moe.top_k=2"]
KINDS = {  # name -> (overrides, the transformers class the export must use; None = remote code)
    "gpt2_dense": ([], "GPT2LMHeadModel"),
    "gpt2_dense_untied_nobias": (["model.tie_embeddings=false", "model.bias=false", "model.activation=relu"],
                                 "GPT2LMHeadModel"),
    "gpt2_dense_rope": (["model.positions=rope"], None),
    "smollm_dense": (SMOLLM, "LlamaForCausalLM"),
    "gpt2_moe": (MOE, None),
    "smollm_moe": (SMOLLM + MOE, "MixtralForCausalLM"),
    "smollm_moe_capacity": (SMOLLM + MOE + ["model.moe.capacity_factor=1.0"], None),
    "gpt2_some": (SOME, None),
    "smollm_some": (SMOLLM + SOME + ["model.some.query_net=mlp", "model.some.center_queries=true"], None),
    "gpt2_some_bf16": (SOME + ["model.some.expert_dtype=bf16"], None),  # stored and computed in bf16
    "gpt2_some_product": (SOME_PK, None),  # product keys over procedural experts, query BatchNorm, selection bias
    "smollm_some_product_stored": (SMOLLM + SOME_PK + ["model.some.expert_storage=stored", "model.some.score=dot",
                                                       "model.some.key_norm=false", "model.some.query_batchnorm=false"],
                                   None),
    "gpt2_some_lora": (SOME + ["model.some.lora_rank=2", "model.some.layer_scale=0.5",
                               "model.some.learnable_tau=true", "model.some.score=dot",
                               "model.some.key_norm=false"], None),
}


@torch.no_grad()
def push_weights(run) -> None:
    """Add noise to every trained parameter and save it as the run's newest checkpoint."""
    loaded = load_run(run, device="cpu")
    gen = torch.Generator().manual_seed(7)
    for name, p in loaded.model.named_parameters():
        if p.requires_grad:
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    for name, b in loaded.model.named_buffers():  # router state an export must carry, off its near-zero start
        if name.endswith(("selection_bias", "query_norm.running_mean")):
            b.add_(0.5 * torch.randn(b.shape, generator=gen))
    state = read_trainer_state(loaded.checkpoint)
    state["step"] = state["step"] + 1
    save_checkpoint(loaded.run_dir, state["step"], loaded.model, None, state, loaded.cfg)
