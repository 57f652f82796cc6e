"""Training: the Engram retrofit and its corpus, the shared skill adapter; all three trainers
(retrofit, skill adapter, and eval's per-user LoRA baseline) run the one loop in trainer.py
with their loss passed in.
"""
