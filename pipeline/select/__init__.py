"""Stage 2 selection: the linear probe, layer scores (probe, geometry, importance, agreement), the
selection rules with their uncertainty, fusion search, significance tests and the selection audit.
Imports core, config and store; never a model.
"""
