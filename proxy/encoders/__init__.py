"""Encoders: parser events -> one endpoint's wire format (SSE chunks or one JSON body)."""
