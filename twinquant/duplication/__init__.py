"""Layer duplication: topology of block copies, their per-copy parameters, and the search that tunes them."""
