"""Evaluation: the head-to-head harness, its scorers, report, retrieval and per-user LoRA baselines.
"""
