"""The project's vocabulary and safe file handling, used by every other package: errors, typed result
records, atomic writes, store locations (local or fsspec URLs), fingerprints, device names, the machine
record and the store lock. Imports nothing from the project outside core.
"""
