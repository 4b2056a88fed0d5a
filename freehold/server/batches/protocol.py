"""OpenAI's Files and Batch APIs: request and response models (pydantic), as the `openai` SDK
reads them (`FileObject`, `Batch`, `BatchRequestCounts`, `BatchUsage`, cursor pages).

A batch's input file is JSONL, one request a line:
`{"custom_id": "...", "method": "POST", "url": "/v1/chat/completions", "body": {...}}`;
its output and error files are JSONL too, one `OutputLine` per input line, keyed by custom_id.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

BatchStatus = Literal[
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
]
# The endpoints whose lines Freehold runs; OpenAI's others (images, moderations...) are refused.
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
# Ledger and metrics name each line's endpoint apart from interactive traffic.
LEDGER_ENDPOINT = {
    "/v1/chat/completions": "batch.chat",
    "/v1/completions": "batch.completions",
    "/v1/embeddings": "batch.embeddings",
}
FILE_PURPOSES = ("batch",)  # what a client may upload; outputs are "batch_output"
COMPLETION_WINDOW_S = 24 * 3600


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    """Built by Freehold; no validation of their own needed."""


# -- requests ----------------------------------------------------------------------------------


class BatchCreateRequest(_Strict):
    input_file_id: str = Field(min_length=1)
    endpoint: str
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = None

    @field_validator("endpoint")
    @classmethod
    def _supported(cls, v: str) -> str:
        if v not in ENDPOINTS:
            raise ValueError(f"Freehold runs batches for {', '.join(ENDPOINTS)}, not {v!r}")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        # OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512.
        if v is not None and (
            len(v) > 16 or any(len(k) > 64 or len(val) > 512 for k, val in v.items())
        ):
            raise ValueError("at most 16 pairs, keys of 64 characters and values of 512")
        return v


# -- files -------------------------------------------------------------------------------------


class FileObject(_Out):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileList(_Out):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(_Out):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


# -- batches -----------------------------------------------------------------------------------


class RequestCounts(_Out):
    total: int
    completed: int
    failed: int


class BatchError(_Out):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(_Out):
    object: Literal["list"] = "list"
    data: list[BatchError]


class InputTokensDetails(_Out):
    cached_tokens: int


class OutputTokensDetails(_Out):
    reasoning_tokens: int = 0


class BatchUsage(_Out):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, cached: int, completion: int) -> BatchUsage:
        return cls(
            input_tokens=prompt,
            input_tokens_details=InputTokensDetails(cached_tokens=cached),
            output_tokens=completion,
            total_tokens=prompt + completion,
        )


class BatchObject(_Out):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None = None
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    usage: BatchUsage | None = None
    metadata: dict[str, str] | None = None


class BatchList(_Out):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


# -- output and error files --------------------------------------------------------------------


class LineResponse(_Out):
    status_code: int
    request_id: str
    body: dict[str, Any]


class LineError(_Out):
    code: str
    message: str


class OutputLine(_Out):
    """One line of a batch's output file (a 200) or error file (anything else)."""

    id: str
    custom_id: str | None
    response: LineResponse | None = None
    error: LineError | None = None
