"""Stage 1's output: the chunked Zarr store of every layer's pooled states (written block by block,
read with digests checked), its DVC record, its resource log, verify and repair, and inspection.
Imports core, hidden_states and config.
"""
