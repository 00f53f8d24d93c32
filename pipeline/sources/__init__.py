"""What goes in: corpora (read, checked, split, written normalised) and model weights (prepared from
local folders, zips, GGUF files or the hub, and loaded). Imports core, hidden_states and config.
"""
