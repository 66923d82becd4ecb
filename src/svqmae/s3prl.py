"""The s3prl upstream at the import path s3prl checkouts use (``svqmae s3prl-install`` writes
``from svqmae.s3prl import ...`` into them); the implementation is :mod:`svqmae.tasks.s3prl`."""

from .tasks.s3prl import UpstreamExpert, install, patch_s3prl, svqmae_local

__all__ = ["UpstreamExpert", "svqmae_local", "install", "patch_s3prl"]
