"""Profile stores: the in-process store, the Redis store (and its key schema and Lua scripts), snapshots.

The profile model and the store protocol the pipeline depends on live in the core (`hyperrec.core.profile`,
`hyperrec.core.profile_store`); this package owns where profiles are kept.
"""
