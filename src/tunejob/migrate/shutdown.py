"""When a fine-tuned OpenAI model stops answering: the dates, their sources, and days left (pure).

The dates live in resources/models.json (`openai_wind_down`), each with its source and the day it
was read, so a changed date is a data edit with a visible provenance. A base with no known date
gets None: inventory then says "unknown", never a guessed date.
"""

from __future__ import annotations

import datetime

from tunejob import catalog


def shutdown_of(model: str, api_date: str | None = None) -> dict | None:
    """{"date", "what", "source", "read"} for a fine-tuned model (or its base, or a job's model);
    None when no published date covers that base. A `shutdown_date` the API itself reports on the
    model object (OpenAI's /v1/models carries one) wins over the table."""
    if api_date:
        return {"date": str(api_date)[:10], "what": "shutdown_date on the model object", "source": "the API's /v1/models", "read": "now"}
    base = catalog.base_of(model).lower()
    for entry in catalog.openai_wind_down().get("finetuned_models", []):
        if base in (b.lower() for b in entry["bases"]):  # exact ids: gpt-4o-mini must not match gpt-4o
            return {k: entry[k] for k in ("date", "what", "source", "read")}
    return None


def days_left(date: str | None, today: datetime.date | None = None) -> int | None:
    """Whole days from today until the date (negative once past); None without a date."""
    if not date:
        return None
    today = today or datetime.date.today()
    return (datetime.date.fromisoformat(date) - today).days


def new_jobs_stop() -> str | None:
    """The day OpenAI stops accepting new fine-tuning jobs (from the same table)."""
    for date, what in catalog.openai_wind_down()["dates"]:
        if "all new training jobs stop" in what:
            return date
    return None
