"""Stage 2 heads: the trainable heads (Lightning modules and their DataModule), training, the
comparison of head types, predict and export, and the predict cost curves. Imports core,
hidden_states, config, sources, store and select.
"""
