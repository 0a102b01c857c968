"""SGLang adapter (GPU serving tier), written against one pinned SGLang release (see `pinned`).

Nothing here imports sglang at module level: the weight updater and trace conversion speak
SGLang's public HTTP API and its documented object shapes, so they are testable on CPU.
"""
