"""Live objects to file plans and back: snapshot (what a save writes), sharded FSDP2 state through
torch.distributed.checkpoint, restore (what a load reads, checked before the first copy), fit checks, RNG.
"""
