"""Model FLOPs (multiply-add = 2) of one forward+backward, counted from shapes.

Backward costs two matmuls per forward matmul when the weight is trained
(input and weight gradients) and one when it is frozen (input gradient only);
attention score/value products count like matmuls. Elementwise work is not counted.
"""

from __future__ import annotations


def linear(tokens: int, d_in: int, d_out: int, trained: bool = True, backward: bool = True) -> int:
    fwd = 2 * tokens * d_in * d_out
    return fwd * (1 + (2 if trained else 1)) if backward else fwd


def dense_ffn(T: int, d: int, hidden: int, gated: bool = False, backward: bool = True) -> int:
    return (3 if gated else 2) * linear(T, d, hidden, backward=backward)


def some_layer(T: int, d: int, E: int, k: int, d_ffn: int, backward: bool = True, query_hidden: int = 0) -> int:
    """Query net (trained: d x d, or d -> query_hidden -> d when query_hidden > 0), scores against
    E keys (backward: the query's gradient only), frozen experts."""
    if query_hidden:
        query = linear(T, d, query_hidden, backward=backward) + linear(T, query_hidden, d, backward=backward)
    else:
        query = linear(T, d, d, backward=backward)
    router = query + 2 * T * d * E * (2 if backward else 1)
    return router + 2 * linear(T * k, d, d_ffn, trained=False, backward=backward)


def some_product_layer(T: int, d: int, n: int, k: int, heads: int, d_k: int, d_ffn: int, backward: bool = True,
                       query_hidden: int = 0) -> int:
    """Product-key SoME: query net (d -> heads x 2 x d_k), every sub-key of the 2 x heads codebooks scored
    (selection only: no backward), the selected pairs' scores again with the query's gradient, and
    heads x k frozen experts of width d_ffn per token."""
    width = 2 * heads * d_k
    if query_hidden:
        query = linear(T, d, query_hidden, backward=backward) + linear(T, query_hidden, width, backward=backward)
    else:
        query = linear(T, d, width, backward=backward)
    table = 2 * T * 2 * heads * n * d_k
    selected = 2 * T * heads * k * 2 * d_k * (2 if backward else 1)
    return query + table + selected + 2 * linear(T * heads * k, d, d_ffn, trained=False, backward=backward)


def moe_layer(T: int, d: int, E: int, k: int, d_ffn: int, gated: bool = False, backward: bool = True) -> int:
    return linear(T, d, E, backward=backward) + (3 if gated else 2) * linear(T * k, d, d_ffn, backward=backward)


def transformer(tokens: int, d: int, n_layers: int, vocab: int, seq: int, ffn_per_layer: int,
                backward: bool = True) -> int:
    """Attention projections, causal score/value products (half of T^2), FFN and head."""
    mult = 3 if backward else 1
    proj = linear(tokens, d, 4 * d, backward=backward)
    attn = 2 * tokens * seq * d * mult  # QK^T and AV over a causal half: 2 * (T^2/2) * d * 2 per sequence
    head = linear(tokens, d, vocab, backward=backward)
    return n_layers * (proj + attn + ffn_per_layer) + head
