"""Task plug-ins beside the eval runner: the built-in query task (data generator, schema, scorer) and the
generic prompt list. The runner itself knows no task."""
