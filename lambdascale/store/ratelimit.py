"""Compatibility re-export: the token bucket lives in :mod:`lambdascale.ratelimit` (one implementation
shared by the store's SSD cap and the data plane's link caps)."""

from lambdascale.ratelimit import BucketState, TokenBucket, gbps_to_bytes_per_s, take

__all__ = ["BucketState", "TokenBucket", "gbps_to_bytes_per_s", "take"]
