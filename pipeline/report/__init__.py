"""What a reader sees: the dataset report with its recommendation first, the study report, the
layer report and the plots. Reads records; imports core, select and heads, never a model run.
"""
