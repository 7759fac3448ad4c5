"""The account a migration reads: the official openai SDK, configured the way the SDK itself is.

The key comes from OPENAI_API_KEY (or the variable named), the endpoint from --base-url or
OPENAI_BASE_URL (the SDK reads it when base_url is None), Azure from --azure-endpoint or
AZURE_OPENAI_ENDPOINT. Anything OpenAI-compatible works: OpenAI, Azure OpenAI, `tunejob serve`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tunejob.backends.openai_api import make_client
from tunejob.spec import OpenAISettings


@dataclass(frozen=True)
class Account:
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    azure_endpoint: str | None = None
    api_version: str | None = None
    timeout: float = 120.0

    def settings(self, max_retries: int) -> OpenAISettings:
        return OpenAISettings(base_url=self.base_url, api_key_env=self.api_key_env, max_retries=max_retries, timeout=self.timeout,
                              azure_endpoint=self.azure_endpoint or os.environ.get("AZURE_OPENAI_ENDPOINT"),
                              api_version=self.api_version or os.environ.get("OPENAI_API_VERSION"))

    def client(self, max_retries: int = 3):
        """A client for reads (the SDK retries 429 / 5xx with Retry-After honoured)."""
        return make_client(self.settings(max_retries))

    def where(self) -> str:
        return self.azure_endpoint or self.base_url or os.environ.get("OPENAI_BASE_URL") or "api.openai.com"
