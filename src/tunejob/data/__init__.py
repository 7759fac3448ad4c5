"""Data: reading, validating (line-numbered problems), token counting and encoding datasets into
token ids with assistant-only labels, and the train/validation split a job uses. Imports only
monitor and the foundation (spec, errors, catalog)."""
