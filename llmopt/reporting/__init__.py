"""Reporting: what llmopt tells people — the compile summary (summary), `compare`, and `report`
(HTML / Markdown: files -> sections -> document -> html / markdown, charts in svg); every number is
written by format."""
