"""Errors that mean "the user asked for something that cannot work here": the CLI prints the
message on one line and exits with code 2, never a traceback."""


class BenchUsageError(ValueError):
    """Bad input to a benchmark (device, video, checkpoint, results file); the message names the fix."""
