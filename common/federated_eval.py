"""Secure federated evaluation: session numbers, the count vector, and checks on its sum.

**Session numbers.** A round's evaluation is a secure-aggregation session of its own, with
fresh keys and shares, numbered :func:`evaluation_session` ``(round)`` (the round number with
bit 62 set). Every key derivation, signature and AEAD context of secure aggregation binds
this number, so nothing from the round's training session can be replayed into its
evaluation or the other way round, and the stage RPCs (which carry the number) reach the
right session without a new field. Training rounds stay far below 2^62.

**Counts.** Each clinic scores the round's candidate and the published model on its own evaluation
slice and sends one vector of non-negative integers, masked, through secure aggregation;
the aggregator learns only the sum over the clinics that finished. For ``k`` classes the
vector holds, in order:

* per class ``c`` (``4k`` values): ``n_c`` (cases whose true class is ``c``), ``both``
  (both models right), ``candidate_only`` and ``published_only`` (exactly one right) —
  the 2x2 table a paired (McNemar-type) test needs;
* the candidate's ``k x k`` confusion matrix (rows: true class, columns: predicted);
* the published model's ``k x k`` confusion matrix.

Every value is a count of the clinic's cases, so a clinic's vector is bounded by its slice
size, and the plan bounds the slice (``max_cases``). Masking works in ``Z_2^32``; a value
"below zero" (a clinic trying to subtract others' counts) wraps to a huge number unless
it is cancelled by other clinics' counts, so the sum is checked before it is used:

* ``bound``: no coordinate of the sum exceeds ``contributors x max_cases`` (wrap-around);
* ``total``: the cases add up to at most ``contributors x max_cases``;
* ``consistency``: for every class the two confusion rows and the paired table describe
  the same ``n_c`` cases, and each model's correct count equals its diagonal.

These catch a malformed or wrapped sum. They cannot prove that each clinic's own vector
was in range (that needs per-client range proofs): a clinic can still shift the totals by
counts that keep the sum consistent, which the gate's own held-out evidence bounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from common.datasets import CLASSES
from common.errors import InvalidUpdateError
from common.tensors import TensorSpec

UInt32Array = npt.NDArray[np.uint32]

#: Per-class values: n, both, candidate_only, published_only.
PAIRED_FIELDS = 4

_SESSION_BIT = 1 << 62


def evaluation_session(round_number: int) -> int:
    """The secure-aggregation session number of ``round_number``'s evaluation."""
    if not 0 < round_number < _SESSION_BIT:
        raise ValueError(f"round number {round_number} is out of range")
    return round_number | _SESSION_BIT


def evaluated_round(session: int) -> int | None:
    """The round an evaluation session belongs to, or None for a training round number."""
    if session & _SESSION_BIT and session < 2 * _SESSION_BIT:
        return session & ~_SESSION_BIT
    return None


def count_length(classes: int) -> int:
    """Length of the count vector for ``classes`` classes."""
    if classes < 1:
        raise ValueError("at least one class is needed")
    return PAIRED_FIELDS * classes + 2 * classes * classes


#: The one "tensor" of an evaluation upload (ring_u32le encoding), for HAM10000's classes.
COUNT_SPEC = TensorSpec("evaluation_counts", (count_length(len(CLASSES)),), "uint32")


#: The checks on a count sum, as CountCheckError.check names them.
COUNT_CHECKS = ("shape", "bound", "total", "consistency")


class CountCheckError(InvalidUpdateError):
    """The summed counts are impossible for honest clinics; ``check`` names the check."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(message)
        self.check = check


@dataclass(frozen=True)
class ClassCounts:
    """The paired 2x2 table of one class (both models on the same ``n`` cases)."""

    n: int
    both: int
    candidate_only: int
    published_only: int


@dataclass(frozen=True)
class EvaluationCounts:
    """Both models' results on a set of cases, as counts only (they pool by adding)."""

    paired: tuple[ClassCounts, ...]
    candidate_confusion: npt.NDArray[np.int64]
    published_confusion: npt.NDArray[np.int64]

    @property
    def cases(self) -> int:
        return sum(c.n for c in self.paired)

    @classmethod
    def of(
        cls,
        labels: Sequence[int] | np.ndarray,
        candidate: Sequence[int] | np.ndarray,
        published: Sequence[int] | np.ndarray,
        classes: int,
    ) -> EvaluationCounts:
        """Counts from true labels and both models' predicted labels (class indices)."""
        y = np.asarray(labels, dtype=np.int64)
        a = np.asarray(candidate, dtype=np.int64)
        b = np.asarray(published, dtype=np.int64)
        if not (y.shape == a.shape == b.shape) or y.ndim != 1:
            raise ValueError("labels and both predictions must be 1-D and of equal length")
        for name, v in (("labels", y), ("candidate", a), ("published", b)):
            if v.size and (v.min() < 0 or v.max() >= classes):
                raise ValueError(f"{name} holds a class index outside [0, {classes})")
        paired = []
        for c in range(classes):
            mask = y == c
            right_a, right_b = a[mask] == c, b[mask] == c
            paired.append(
                ClassCounts(
                    n=int(mask.sum()),
                    both=int((right_a & right_b).sum()),
                    candidate_only=int((right_a & ~right_b).sum()),
                    published_only=int((~right_a & right_b).sum()),
                )
            )
        return cls(tuple(paired), _confusion(y, a, classes), _confusion(y, b, classes))

    def to_vector(self) -> UInt32Array:
        """The vector a clinic masks and uploads (layout in the module docstring)."""
        k = len(self.paired)
        head = [v for c in self.paired for v in (c.n, c.both, c.candidate_only, c.published_only)]
        out = np.concatenate(
            [
                np.asarray(head, dtype=np.int64),
                self.candidate_confusion.reshape(-1),
                self.published_confusion.reshape(-1),
            ]
        )
        if out.size != count_length(k) or out.min(initial=0) < 0 or out.max(initial=0) >= 2**32:
            raise ValueError("counts must be non-negative and fit in uint32")
        return out.astype(np.uint32)

    def to_json(self) -> dict[str, object]:
        return {
            "cases": self.cases,
            "paired": [[c.n, c.both, c.candidate_only, c.published_only] for c in self.paired],
            "candidate_confusion": self.candidate_confusion.tolist(),
            "published_confusion": self.published_confusion.tolist(),
        }


def decode_sum(
    summed: np.ndarray, *, classes: int, contributors: int, max_cases: int
) -> EvaluationCounts:
    """Check the unmasked sum of ``contributors`` count vectors and decode it.

    Raises :class:`CountCheckError` naming the first check that fails (see the module
    docstring); nothing is decoded from a sum that fails one.
    """
    k = classes
    vector = np.asarray(summed)
    if vector.shape != (count_length(k),):
        raise CountCheckError(
            "shape", f"the count sum has {vector.size} values, the layout needs {count_length(k)}"
        )
    if contributors < 1 or max_cases < 1:
        raise ValueError("contributors and max_cases must be positive")
    values = vector.astype(np.int64)
    limit = contributors * max_cases
    if values.max(initial=0) > limit:
        at = int(values.argmax())
        raise CountCheckError(
            "bound",
            f"count coordinate {at} of the sum is {int(values[at])}, more than {contributors} "
            f"clinic(s) x {max_cases} cases allow (a negative or oversized count wrapped)",
        )
    head = values[: PAIRED_FIELDS * k].reshape(k, PAIRED_FIELDS)
    cand = values[PAIRED_FIELDS * k : PAIRED_FIELDS * k + k * k].reshape(k, k)
    pub = values[PAIRED_FIELDS * k + k * k :].reshape(k, k)
    total = int(head[:, 0].sum())
    if total > limit:
        raise CountCheckError(
            "total",
            f"the slices add up to {total} cases, more than {contributors} clinic(s) x "
            f"{max_cases} allow",
        )
    for c in range(k):
        n, both, cand_only, pub_only = (int(v) for v in head[c])
        problems = []
        if both + cand_only + pub_only > n:
            problems.append(f"{both + cand_only + pub_only} right answers among {n} cases")
        if int(cand[c].sum()) != n or int(pub[c].sum()) != n:
            problems.append(
                f"confusion rows of {int(cand[c].sum())} and {int(pub[c].sum())} cases for {n}"
            )
        if int(cand[c, c]) != both + cand_only or int(pub[c, c]) != both + pub_only:
            problems.append("the diagonal disagrees with the paired table")
        if problems:
            raise CountCheckError(
                "consistency", f"class {c} of the count sum is inconsistent: {'; '.join(problems)}"
            )
    paired = tuple(ClassCounts(*(int(v) for v in row)) for row in head)
    return EvaluationCounts(paired, cand, pub)


def _confusion(labels: np.ndarray, predicted: np.ndarray, classes: int) -> npt.NDArray[np.int64]:
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


__all__ = [
    "COUNT_CHECKS",
    "COUNT_SPEC",
    "ClassCounts",
    "CountCheckError",
    "EvaluationCounts",
    "count_length",
    "decode_sum",
    "evaluated_round",
    "evaluation_session",
]
