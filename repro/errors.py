"""Exceptions that carry a message meant for the researcher, not a traceback."""


class ReproError(Exception):
    """Base class for errors reported as one clear line."""


class SpecError(ReproError):
    """A spec or published-table file is malformed; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class MissingResource(ReproError):
    """A checkpoint, dataset or optional dependency is missing; the message says what to get and where."""


class UnknownName(ReproError):
    """A name was looked up in a registry and not found."""
