"""Domain errors shared by both daemons.

Pure logic raises these; the thin gRPC servicers map each class to one status code
(see ``aggregator.servicers``), so a rule lives in one place and one place only.
"""

from __future__ import annotations

# Trailing-metadata key under which a servicer names a refusal the caller must act on.
REFUSAL_KEY = "dermafed-refusal"


class DermafedError(Exception):
    """Base class: every error the project raises on purpose.

    ``refusal``, where a subclass sets it, travels to the caller as trailing metadata
    (``REFUSAL_KEY``), so a client can tell this refusal from others of the same status.
    """

    refusal: str | None = None


class InvalidArgumentError(DermafedError):
    """A request argument is missing or malformed (an operator's typo, an empty reason)."""


class ConfigError(DermafedError):
    """A configuration file or override is invalid; the message names the bad key."""


class InvalidUpdateError(DermafedError):
    """An uploaded update is malformed: wrong layout, length, dtype or non-finite values."""


class StaleRoundError(DermafedError):
    """A message refers to a round that is not the one running (or to a finished stage)."""


class DuplicateSubmissionError(DermafedError):
    """A clinic sent the same stage's message twice."""


class NotInCohortError(DermafedError):
    """The calling clinic was not selected for this round."""


class ExcludedError(DermafedError):
    """The operator has excluded the calling clinic from the federation (for now)."""


class NotFoundError(DermafedError):
    """A referenced checkpoint, round or clinic does not exist."""


class PreconditionError(DermafedError):
    """The federation is not in a state where the request makes sense."""


class PrivacyResetError(PreconditionError):
    """A clinic reported less epsilon spent than before: its privacy ledger was reset."""

    # The agent stops on this refusal instead of retrying (see DermafedError.refusal).
    refusal = "privacy-reset"


class PayloadTooLargeError(DermafedError):
    """An upload exceeded its declared or configured size."""


class IntegrityError(DermafedError):
    """Stored data failed its integrity check (hash mismatch, truncated file)."""


class BusyError(DermafedError):
    """The service is at a capacity limit right now; the caller should retry later."""


class InUseError(DermafedError):
    """A state directory or port this process needs is held by another process."""
