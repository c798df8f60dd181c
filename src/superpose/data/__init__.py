"""Data layer: corpus sources (corpus), tokenizers (tokenizer), on-disk token shards (shards),
`superpose prepare` (prepare) and the resumable window loader (loader).

Submodules are imported directly so that `import superpose.data` stays cheap (no torch/datasets).
"""
