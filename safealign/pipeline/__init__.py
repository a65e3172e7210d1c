"""ADPO preference-data pipeline (METHODS.md A.2): generation -> annotation -> triples.

Submodules are imported lazily by their users (``safealign.pipeline.judge``); nothing heavy here.
"""
