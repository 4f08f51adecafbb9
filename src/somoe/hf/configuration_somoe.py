"""Configuration of an exported somoe language model (Hugging Face remote code).

This file is copied into every remote-code export next to ``modeling_somoe.py``;
it imports only ``transformers``, so the folder loads where somoe is not installed.
"""

from transformers import PretrainedConfig


class SomoeConfig(PretrainedConfig):
    """The inference-time shape of a somoe model.

    ``ffn`` is ``dense``, ``moe`` or ``some``; ``moe`` and ``some`` hold that FFN's settings
    as plain dicts (see ``modeling_somoe``). ``tie_head`` shares the token embedding with the
    output head inside the model itself (``tie_word_embeddings`` stays False so that no
    version-specific weight tying of ``transformers`` is involved).
    """

    model_type = "somoe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, backbone="gpt2", vocab_size=8192, hidden_size=256, num_hidden_layers=4,
                 num_attention_heads=4, max_position_embeddings=256, positions="learned", rope_base=10000.0,
                 tie_head=True, bias=True, norm_eps=1e-5, ffn="dense", ffn_hidden=1024, activation="gelu",
                 moe=None, some=None, expert_sha256=None, use_cache=True, **kwargs):
        self.backbone = backbone
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.positions = positions
        self.rope_base = rope_base
        self.tie_head = tie_head
        self.bias = bias
        self.norm_eps = norm_eps
        self.ffn = ffn
        self.ffn_hidden = ffn_hidden
        self.activation = activation
        self.moe = dict(moe or {})
        self.some = dict(some or {})
        self.expert_sha256 = dict(expert_sha256 or {})  # layer index (str) -> sha256 of its frozen experts
        self.use_cache = use_cache
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)
