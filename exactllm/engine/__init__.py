"""The serving engine: sequences, paged KV blocks, continuous-batching scheduler, model runner."""
