"""Client side of the gRPC contract, shared by the CLI and the load tester: the only client code that imports
grpc, grpc_health or the generated stubs (the import contract in pyproject.toml keeps it so).

connect.py builds channels (plaintext, TLS, mutual TLS) and the token metadata; recommend.py makes one Recommend
call from plain values and formats the answer; aio.py is the load tester's asyncio Recommender client; admin.py
calls ModelAdmin; health.py calls grpc.health.v1. A refused call raises errors.ClientError (status code name and
details), except in aio.py, whose calls return an outcome so a hot loop never unwinds an exception.
"""
