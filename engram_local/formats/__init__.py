"""Files: GGUF header scan, the Engram sidecar, .eov memory files (read/write, the override-stack
opener), LoRA adapter files, the model fingerprint, `inspect` descriptions. No torch.
"""
