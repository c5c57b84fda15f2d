"""Getting jobs run: ``embedded`` (threads in the CLI, no services) and ``distributed`` (Celery over Redis:
``farm worker`` processes, ``farm beat``); ``wire`` signs the results workers send back."""
