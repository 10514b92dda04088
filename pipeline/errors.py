"""One exception type for every user-facing failure: the CLI prints it as one line and exits non-zero."""


class H2TError(Exception):
    """A problem with the user's input (config value, model, dataset, file, layer) — never a bug."""
