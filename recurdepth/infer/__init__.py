"""Inference on trained looped models: checkpoint loading, the KV-cached decoder with adaptive depth, text
generation and the depth-sweep evaluation (`recurdepth eval`, `recurdepth generate`)."""
