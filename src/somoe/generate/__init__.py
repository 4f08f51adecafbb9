"""Text generation from a trained model: sampling, batched decoding with a KV cache, a prompt loop."""
