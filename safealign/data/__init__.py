"""Data: canonical-record loaders (sources), control tokens, collation and data modules."""
