"""The on-disk contract: every name (layout), the manifest, state trees, safetensors headers, DCP's
metadata read as hostile input, the PEFT adapter layout. Imports nothing of ckptguard but errors.

The format is described once, in docs/format.md.
"""
