"""Which checkpoints exist (discovery), which can be trusted (verify), which to keep (retention), and
how a run's checkpoints are listed. Reads only: nothing here creates, renames or deletes.
"""
