"""The data stage: read web corpora, tag languages, filter, dedup, tokenize, pack and mix.

Ray Data does the per-document work (reading with column projection, language ID on an actor
pool, quality filters, tokenization); the driver keeps what needs one global view (exact and
near-duplicate removal in corpus order, per-language packing, the mix) and writes the shards.
"""

from components.data.errors import DataError
from components.data.pipeline import DataResult, prepare_data

__all__ = ["DataError", "DataResult", "prepare_data"]
