"""The commit protocol, once per kind of storage: a staging directory renamed into place
(:mod:`ckptguard.commit.publish`) and a bucket commit by marker (:mod:`ckptguard.commit.remote_publish`).
Nothing else creates, renames or removes checkpoints. The steps are described in docs/protocol.md.
"""
