"""Running the services: the local stack (no Docker), each service's entrypoint (the same commands under
compose and locally), the compose helper the Makefile calls, and the demo. Above the queue, below the CLI."""
