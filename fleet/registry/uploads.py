"""Streaming uploads: every file goes to a temporary file on disk, never into memory,
and an upload over ARTIFACT_MAX_UPLOAD_BYTES is stopped as soon as it crosses the limit."""

from __future__ import annotations

from django.conf import settings
from django.core.files.uploadhandler import TemporaryFileUploadHandler

from fleet.core.errors import TooLarge


def _too_large(limit: int) -> TooLarge:
    return TooLarge(
        f"The upload is larger than the limit of {limit} bytes (ARTIFACT_MAX_UPLOAD_BYTES).",
        code="too_large",
        field="file",
    )


class LimitedTemporaryFileUploadHandler(TemporaryFileUploadHandler):
    # Multipart overhead (boundaries, other fields) is small; allow it on top of the limit.
    ENVELOPE_SLACK_BYTES = 64 * 1024

    def handle_raw_input(self, input_data, META, content_length, boundary, encoding=None):
        limit = settings.ARTIFACT_MAX_UPLOAD_BYTES
        if content_length and content_length > limit + self.ENVELOPE_SLACK_BYTES:
            raise _too_large(limit)  # refuse before reading a byte of the body
        self.received = 0

    def receive_data_chunk(self, raw_data, start):
        self.received += len(raw_data)
        if self.received > settings.ARTIFACT_MAX_UPLOAD_BYTES:
            self.file.close()  # deletes the temporary file
            raise _too_large(settings.ARTIFACT_MAX_UPLOAD_BYTES)
        return super().receive_data_chunk(raw_data, start)
