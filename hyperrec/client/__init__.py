"""Client side of the gRPC contract, shared by the CLI and the load tester."""
