"""Relevance-diversity DPP selection of safety data to mix into fine-tuning.

``relevance`` + ``greedy_map`` (:mod:`.dpp`) are pure tensor functions; embedders and the embedding cache
live in :mod:`.embed`; ``select_safety_subset`` (:mod:`.select`) ties them to :class:`~spard.data.records.Record`.
"""

from spard.selection.dpp import RIDGE, dpp_kernel, greedy_map, greedy_map_full_kernel, greedy_map_naive, relevance
from spard.selection.embed import (
    Embedder,
    LMEmbedder,
    ReloadedLMEmbedder,
    SentenceTransformerEmbedder,
    cached_embed,
    embed_from_superset,
    packaged_encoder_path,
)
from spard.selection.select import METHODS, select_indices, select_safety_subset, selection_stats

__all__ = [
    "METHODS",
    "RIDGE",
    "Embedder",
    "LMEmbedder",
    "ReloadedLMEmbedder",
    "SentenceTransformerEmbedder",
    "cached_embed",
    "embed_from_superset",
    "dpp_kernel",
    "greedy_map",
    "greedy_map_full_kernel",
    "greedy_map_naive",
    "packaged_encoder_path",
    "relevance",
    "select_indices",
    "select_safety_subset",
    "selection_stats",
]
