"""A run directory and what saves into it: the manager, preflight and the run lock, pruning, background
saves, preemption signals, the remote tier, LoRA adapter directories, and the locations the CLI opens.
"""
