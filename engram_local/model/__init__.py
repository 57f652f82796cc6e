"""The Engram model in torch: the Engram module (engram.py reads like the paper), backbone
loading, checkpoints, LoRA.
"""
