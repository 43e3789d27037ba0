"""Data: samples, file formats, the built-in bilingual tasks, and batching."""

from kopru.data.sample import Sample

__all__ = ["Sample"]
