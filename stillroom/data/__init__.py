"""Text in, batches out: row formats (rows.py), chat rendering and masking (render.py), examples,
packing and batches (examples.py), and the memory-mapped token store (store.py, store_build.py)."""
