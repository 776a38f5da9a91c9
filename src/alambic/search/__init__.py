"""Student shape search: a budget (speed-up, latency or size) instead of a hand-picked shape."""

from alambic.search.budget import Budget
from alambic.search.search import SEARCH_FILE, ShapeSearch, search_shape, searched_shape

__all__ = ["Budget", "SEARCH_FILE", "ShapeSearch", "search_shape", "searched_shape"]
