"""The mathematics of Data Value Embedding: the backward recursion, its segments and chains
(docs/method.md). Pure tensor code: no store, no Ray."""
