"""How much a segment actor holds at once: light (no Ray, no torch), so plan/estimate.py imports
the same numbers the actor uses (embed/segment.py)."""

READ_CHUNK = 32  # steps per read of the sweep's gradient readers
WRITE_CHUNK = 256  # steps of local embeddings held before writing
# a write chunk's local embeddings are held until written: at most this many bytes of them
WRITE_CHUNK_BYTES = 512 << 20
