"""The configuration: params.yaml's sections as typed models (sections, built from the field types in
fields) and load_params (params), which every stage calls first. Imports core and hidden_states."""
