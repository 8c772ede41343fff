"""Where bytes become durable: everything that depends on the kind of storage under a run directory.

``durable`` holds the POSIX primitives (write every byte, fsync a file, fsync a directory, replace a
file atomically). The commit protocol itself (:mod:`ckptguard.publish`) is written against these
primitives only; a second storage form (object storage, which has no rename and commits by a
create-only marker object) gets a module of its own here and a publish form of its own, without any
module having to know both.
"""
