"""The models nlrw measures: the subject (a causal LM with named hookpoints), the sparse
coders (TopK transcoders and SAEs, nlrw's or sparsify's), top-k encoding, quantile tables and
activation shards. Stages use these; these use only :mod:`nlrw.lib` and ``nlrw._core``."""
