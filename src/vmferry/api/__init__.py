"""The wire schema shared by the daemon's HTTP API and the client."""
