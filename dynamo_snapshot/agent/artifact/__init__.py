"""The checkpoint on storage: layout, manifest and its verification, page check, prefetch."""
