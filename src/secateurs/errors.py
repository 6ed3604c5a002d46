"""Errors a user can act on. The CLI prints their message and exits with status 2."""


class SecateursError(ValueError):
    """Bad input: the message says what is wrong and what to do."""


class UnsupportedModelError(SecateursError):
    """The model family has no adapter."""


class PlanError(SecateursError):
    """A plan that cannot be applied to this model (wrong model, unrepresentable GQA split, ...)."""


class OutputExistsError(SecateursError):
    """The output directory exists and overwriting was not requested."""
