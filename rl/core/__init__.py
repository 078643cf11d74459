"""Bottom layer: errors, the registry, typed options (schema), batching and the batch types
that move through a step. Imports nothing else of the project."""
