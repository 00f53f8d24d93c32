"""How a model's hidden states are read: the attention implementation, the layer tap (hooks on each
block), the pooling functions and token-budget batching. Shared by Stage 1 (extract) and predict.
Imports only core.
"""
