"""Object storage: the S3 client with create-only writes and conditional deletes, typed errors, and the
lease that keeps one writer per remote run.
"""
