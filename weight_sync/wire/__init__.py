"""What crosses processes: the buffer layout, packed messages and their headers, hashes,
deltas, authentication, shared-memory segments, snapshots and the store's value formats."""
