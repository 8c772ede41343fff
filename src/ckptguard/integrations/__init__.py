"""Verified, crash-safe checkpoints for other training libraries, each over that library's own save.

``hf`` (transformers Trainer), ``accelerate`` (save_state / load_state) and ``lightning``
(a CheckpointIO plugin) each let the library write its files as it always does, but into a staging
directory; :mod:`ckptguard.integrations.staged` then commits them through :mod:`ckptguard.commit.publish`,
the one commit path. Import the submodule you need: each imports its library on first use only.
"""
