"""Model backbones (tensors in, logits out; nothing distributed)."""
