"""Names the bench command line and the benches share, torch-free (the parser is built without importing torch)."""

GPU_CHECKS = ("te-vs-local", "train-step", "decode", "compile", "ckpt-te-local", "quiet-star")  # bench gpu-check
