"""Which priority level a received photo gets: the ordered rules of ``[[queues.rules]]``.

A rule names a level of ``queues.priorities`` and conditions on the calling AE title, the SOP
Class UID and header attributes (by DICOM keyword), each a shell glob; every condition of a
rule must match, the first rule that matches wins, and a photo that no rule matches gets
``queues.default_priority``. The listener evaluates the rules once, when it records the job;
the level is kept on the job row and every publication of the job uses its broker priority.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dermpacs.config import PriorityRule, QueuesSettings

# Header values of the attributes the rules read, by keyword; an absent or empty attribute
# is one empty string, so that "*" matches it and a specific pattern does not.
HeaderValues = Mapping[str, Sequence[str]]


def header_values(header: Dataset, keywords: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The values of ``keywords`` in ``header`` as text, padding removed."""
    values: dict[str, tuple[str, ...]] = {}
    for keyword in keywords:
        value = header.get(keyword)
        if value is None or value == "":
            values[keyword] = ("",)
        elif isinstance(value, MultiValue | list | tuple):
            values[keyword] = tuple(str(v).strip() for v in value) or ("",)
        else:
            values[keyword] = (str(value).strip(),)
    return values


@dataclass(frozen=True)
class PriorityRules:
    """The rules of one configuration, ready to choose levels."""

    rules: tuple[PriorityRule, ...]
    default_level: str

    @classmethod
    def from_settings(cls, queues: QueuesSettings) -> PriorityRules:
        return cls(rules=tuple(queues.rules), default_level=queues.default_priority)

    @property
    def keywords(self) -> tuple[str, ...]:
        """The header attributes some rule reads (for the listener to collect)."""
        seen: dict[str, None] = {}
        for rule in self.rules:
            seen.update(dict.fromkeys(rule.tags))
        return tuple(seen)

    def level_for(self, *, calling_ae_title: str, sop_class_uid: str, header: HeaderValues) -> str:
        """The level of the first rule that matches, or the default level."""
        caller = calling_ae_title.strip()
        for rule in self.rules:
            if rule.calling_ae_title and not fnmatchcase(caller, rule.calling_ae_title):
                continue
            if rule.sop_class_uid and not fnmatchcase(sop_class_uid, rule.sop_class_uid):
                continue
            if all(
                any(fnmatchcase(value, pattern) for value in header.get(keyword, ("",)))
                for keyword, pattern in rule.tags.items()
            ):
                return rule.level
        return self.default_level
