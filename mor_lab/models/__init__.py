"""The decoder, its depth-step KV cache, and checkpoint loading."""
