"""Stage 1: every corpus through every model once. The driver's block loop, the forward pass (eager
or compiled), the process world and its scale-out over Lightning Fabric. Imports core,
hidden_states, config, sources and store.
"""
