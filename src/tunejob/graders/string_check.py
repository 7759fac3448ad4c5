"""string_check: 1.0 or 0.0 from comparing the rendered input with the rendered reference.

The graders guide: eq (equal, case-sensitive), ne (not equal), like (the input contains the
reference, case-sensitive), ilike (contains, ignoring case). Nothing is trimmed: a trailing
newline makes `eq` fail on OpenAI too, and a grader should say so rather than hide it.
"""

from __future__ import annotations


def string_check(operation: str, text: str, reference: str) -> float:
    if operation == "eq":
        return float(text == reference)
    if operation == "ne":
        return float(text != reference)
    if operation == "like":
        return float(reference in text)
    if operation == "ilike":
        # casefold, not lower: "STRASSE" contains "straße" as a person reading it would say
        return float(reference.casefold() in text.casefold())
    raise ValueError(f"unknown string_check operation {operation!r}")  # schema.check_grader refuses it first
