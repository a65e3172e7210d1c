"""ADPO preference-data pipeline (docs/methods.md A.2): generation -> annotation -> triples.

Submodules are imported lazily by their users (``safealign.pipeline.adpo``); nothing heavy here.
"""
