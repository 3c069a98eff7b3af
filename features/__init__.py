"""The feature store: HDF5 layout, journalled crash-safe writing, fingerprints and reading."""

from features.store import FeatureStore, StoreError, fingerprint

__all__ = ["FeatureStore", "StoreError", "fingerprint"]
