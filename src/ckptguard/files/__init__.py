"""Bytes become durable local files: POSIX fsync primitives, xxh3-128 hashing, the writer that streams,
hashes and fsyncs, the close watch over files another library writes, and the run's events log.
"""
