"""Getting jobs run: ``embedded`` (threads in the CLI, no services); Celery arrives with the distributed farm."""
