"""The run configuration: model, FFN variants, data and training sections.

Field comments double as documentation of the YAML keys; `somoe train --help`
points here. Validation that needs several fields at once lives in
``validate`` methods so a bad combination fails before anything allocates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .loading import ConfigError
from .moe import MoEConfig
from .some import SoMEConfig
from .transition import TransitionConfig


MAX_TENSOR_ELEMENTS = 10**12  # 4 TB in fp32: past any single device, far below int64 overflow


@dataclass
class ModelConfig:
    backbone: Literal["gpt2", "smollm"] = "gpt2"  # gpt2: LayerNorm+GELU+biases; smollm: RMSNorm+SwiGLU, no biases
    vocab_size: int = 8192  # BPE vocabulary, special tokens included
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 256  # longest context (learned position table size, RoPE cache size)
    positions: Literal["learned", "sinusoidal", "rope", "none"] = "learned"  # smollm requires rope
    rope_base: float = 10000.0
    tie_embeddings: bool = True  # share token embedding and output head
    bias: bool = True  # linear/norm biases (gpt2 backbone; smollm has none)
    dropout: float = 0.0  # residual/embedding dropout
    attn_dropout: float = 0.0  # attention-probability dropout (forces SDPA's slower math kernel on CPU)
    norm_eps: float = 1e-5
    init_std: float = 0.02
    ffn: str = "dense"  # FFN variant by registry name: dense | moe | some
    d_ffn: int = 0  # hidden width of the dense FFN (and MoE experts); 0 = 4*d_model (gpt2) or ~8/3*d_model (smollm)
    activation: Literal["gelu", "relu", "swiglu"] = "gelu"  # dense/MoE expert activation; smollm uses swiglu
    moe: MoEConfig = field(default_factory=MoEConfig)
    some: SoMEConfig = field(default_factory=SoMEConfig)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        if self.d_ffn > 0:
            return self.d_ffn
        if self.activation == "swiglu":
            # LLaMA/SmolLM convention: 2/3 of 4d, rounded up to a multiple of 64
            return ((int(8 * self.d_model / 3) + 63) // 64) * 64
        return 4 * self.d_model

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be positive")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                f"pick n_heads among the divisors of d_model"
            )
        if self.positions == "rope" and self.head_dim % 2:
            raise ConfigError(f"RoPE needs an even head size, got d_model/n_heads={self.head_dim}")
        if self.backbone == "smollm" and self.positions != "rope":
            raise ConfigError("model.backbone=smollm uses RoPE; set model.positions=rope")
        if self.backbone == "smollm" and self.activation != "swiglu":
            raise ConfigError("model.backbone=smollm uses SwiGLU; set model.activation=swiglu")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be in [0, 1)")
        self._check_tensor_sizes()

    def _check_tensor_sizes(self) -> None:
        """Refuse a shape whose largest weight no machine can hold, before anything allocates
        (PyTorch would fail deep inside with a storage-size overflow)."""
        sizes = {"vocab_size": self.vocab_size * self.d_model, "d_ffn": self.ffn_hidden * self.d_model,
                 "max_seq_len": self.max_seq_len * self.d_model,  # the position table / RoPE cache
                 "n_layers": self.n_layers * self.d_model * self.d_model}  # one attention projection per layer
        if self.ffn == "some" and self.some.expert_storage == "stored":
            sizes["some.d_ffn"] = self.some.num_experts * self.some.d_ffn * self.d_model
        if self.ffn == "moe":
            sizes["moe.num_experts"] = self.moe.num_experts * self.ffn_hidden * self.d_model
        key, largest = max(sizes.items(), key=lambda kv: kv[1])
        if largest > MAX_TENSOR_ELEMENTS:
            raise ConfigError(f"model.d_model={self.d_model} with model.{key} gives a {largest:.2g}-element weight "
                              f"(limit {MAX_TENSOR_ELEMENTS:.0e}); use a smaller model")


@dataclass
class DataConfig:
    # auto: files if train_path is set, else builtin (the real TinyStories stories shipped with somoe:
    # 2,415 training and 300 dev stories, CDLA-Sharing-1.0); tinystories: the full dataset from the hub
    source: Literal["auto", "builtin", "tinystories", "files"] = "auto"
    train_path: str = ""  # local .txt (<|endoftext|> separated) / .jsonl (text field) / .parquet (text column)
    val_path: str = ""  # if empty with train_path set, the last val_fraction of train stories
    val_fraction: float = 0.05
    builtin_train_stories: int = 0  # use only the first N built-in training stories (0 = all 2,415)
    builtin_val_stories: int = 0  # use only the first N built-in dev stories (0 = all 300)
    hub_dataset: str = "roneneldan/TinyStories"
    hub_train_stories: int = 20000  # first N stories of the hub train split (seed 000: 20,000)
    hub_val_stories: int = 5000  # first N stories of the hub validation split (seed 000: 5,000)
    tokenizer_path: str = ""  # reuse an existing tokenizer.json instead of training one
    tokenizer_train_stories: int = 20000  # stories used to train the BPE
    mode: Literal["packed", "padded"] = "packed"  # packed: EOS-joined random windows; padded: one story per row
    seq_len: int = 256  # training context; must be <= model.max_seq_len
    cache_dir: str = ""  # pretokenized cache; empty = ~/.cache/somoe (or $SOMOE_CACHE)

    def validate(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len={self.seq_len} must be at least 2")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        for name in ("builtin_train_stories", "builtin_val_stories"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name}={getattr(self, name)} must be >= 0 (0 = all built-in stories)")
        if self.val_path and not self.train_path:
            raise ConfigError("data.val_path is set without data.train_path; set both")


@dataclass
class TrainConfig:
    batch_size: int = 32  # global batch in sequences per optimizer step (split across ranks and micro-batches)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 0  # optimizer steps; 0 = derive from epochs
    epochs: float = 1.0  # passes over the training tokens (used when max_steps = 0)
    max_minutes: float = 0.0  # stop (and evaluate) after this wall time; 0 = no limit
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    schedule: Literal["cosine", "onecycle", "constant", "linear"] = "cosine"
    warmup_steps: int = -1  # -1 = 3% of the steps
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA>=8.0 and CPU, else fp32
    # true: torch.compile the model; step: the whole training step as one graph (train/step.py)
    compile: bool | Literal["step"] = False
    compile_backend: str = "inductor"  # torch.compile backend of train.compile=step (eager/aot_eager: tests)
    cuda_graphs: bool = False  # the compiled step replayed as a CUDA graph (implies train.compile=step; CUDA only)
    activation_checkpointing: bool = False
    device: str = "auto"  # auto = cuda > mps > cpu
    seed: int = 1337
    eval_every: int = 200  # optimizer steps between evals; 0 = only at the end
    eval_batches: int = 0  # cap on eval batches (0 = the whole validation set)
    eval_batch_size: int = 0  # 0 = batch_size
    log_every: int = 10
    ckpt_every: int = 0  # optimizer steps between checkpoints; 0 = at evals and at the end
    keep_last: int = 2  # checkpoints kept on disk (the best one is kept as well); 0 = keep all
    max_bad_steps: int = 5  # steps skipped for a non-finite loss or gradient norm before training stops with an error
    sample_every_eval: bool = False  # print a greedy sample at each eval
    num_threads: int = 0  # torch CPU threads; 0 = torch default

    def validate(self) -> None:
        if self.batch_size <= 0 or self.grad_accum <= 0:
            raise ConfigError("train.batch_size and train.grad_accum must be positive")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"train.batch_size={self.batch_size} is not divisible by train.grad_accum={self.grad_accum}"
            )
        if self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr} must be positive")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ConfigError("set train.max_steps or train.epochs to a positive value")
        for name, meaning in (("keep_last", "0 keeps all"), ("ckpt_every", "0 saves at evals and at the end"),
                              ("eval_every", "0 evaluates only at the end"), ("max_bad_steps", "0 stops at the first"),
                              ("eval_batches", "0 = the whole validation set"),
                              ("eval_batch_size", "0 = train.batch_size"), ("max_steps", "0 = from epochs"),
                              ("warmup_steps", "-1 = 3% of the steps")):
            floor = -1 if name == "warmup_steps" else 0
            if getattr(self, name) < floor:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= {floor} ({meaning})")
        if self.log_every <= 0:
            raise ConfigError(f"train.log_every={self.log_every} must be positive (steps between train records)")


@dataclass
class RunConfig:
    name: str = "run"
    description: str = ""  # free text: where the preset comes from, what differs from the seed
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    transition: TransitionConfig = field(default_factory=TransitionConfig)  # somoe transition's phase 2 (seed 004)

    def validate(self) -> None:
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; "
                f"raise model.max_seq_len or lower data.seq_len"
            )
