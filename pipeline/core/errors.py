"""User-facing errors: a stage turns these into a one-paragraph message and a non-zero exit, no traceback."""


class PipelineError(Exception):
    """A mistake the user can fix (bad config, bad data, a missing artifact). The message says what to do."""


class ConfigError(PipelineError):
    """The recipe or an override is invalid."""


class MissingArtifactError(PipelineError):
    """An input artifact is absent or incomplete; the message names the stage to run first."""


class DataError(PipelineError):
    """Input data could not be read or too little of it survived validation."""


class GateFailure(PipelineError):
    """One or more evaluation gates failed; the evaluation artifact is written and the message says which."""
