"""The daemon: watches its node's pods, runs operations, speaks the protocol with the operator."""
